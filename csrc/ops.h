// The CPU fused ops that bindings.cpp exposes to noprop_fast.cpu_ops. Inputs arrive contiguous
// and checked (shapes, dtypes, device) from Python; each op checks only what would corrupt memory.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace noprop {

// noise.cpp: Philox normals and the noise injection z = a[b, n] W[y[n]] + s[b, n] eps[b, n], a and
// s as [B, N] views (stride 0 over n for per-block scales)
at::Tensor philox_randn(int64_t seed, int64_t offset, int64_t numel);
at::Tensor noise_forward(const at::Tensor& y, const at::Tensor& W, const at::Tensor& a,
                         const at::Tensor& s, const at::Tensor& seed, const at::Tensor& offset);
// -> (dW [m, d] fp32 when need_dw; da [B, N] fp32 when W is given; ds [B, N] fp32 when seed and
// offset are given), undefined where not asked for; the caller casts dW and sums a [B] scale's
std::vector<at::Tensor> noise_backward(const at::Tensor& dz, const at::Tensor& y,
                                       const at::Tensor& a, int64_t num_classes,
                                       const std::optional<at::Tensor>& W,
                                       const std::optional<at::Tensor>& seed,
                                       const std::optional<at::Tensor>& offset, bool need_dw);

// block_loss.cpp: losses[b] = mean_n w[b, n] ||u_hat[b, n] - u[n]||^2 (w [B] or [B, N]) and its
// gradients (d u_hat, d u, dw [B, N] fp32: the caller sums a [B] weight's)
at::Tensor block_loss_forward(const at::Tensor& u_hat, const at::Tensor& u, const at::Tensor& w);
std::vector<at::Tensor> block_loss_backward(const at::Tensor& grad, const at::Tensor& u_hat,
                                            const at::Tensor& u, const at::Tensor& w,
                                            bool need_du_hat, bool need_du, bool need_dw);

// block_linear.cpp: Y[b] = X[b] W[b]^T + bias[b] and (dX, dW, dbias)
at::Tensor block_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias);
std::vector<at::Tensor> block_linear_backward(const at::Tensor& dy, const at::Tensor& x,
                                              const at::Tensor& weight, bool need_dx,
                                              bool need_dw, bool need_dbias);

// softmax_head.cpp: o = softmax(h k^T + c) v tile by tile -> (o fp32, lse, P or undefined: P
// [B, N, m] only when one tile holds it), and its gradients
std::vector<at::Tensor> softmax_head_forward(const at::Tensor& h, const at::Tensor& k,
                                             const std::optional<at::Tensor>& c,
                                             const at::Tensor& v, int64_t tile_elements);
std::vector<at::Tensor> softmax_head_backward(const at::Tensor& grad_o, const at::Tensor& h,
                                              const at::Tensor& k,
                                              const std::optional<at::Tensor>& c,
                                              const at::Tensor& v, const at::Tensor& o,
                                              const at::Tensor& lse,
                                              const std::optional<at::Tensor>& saved_probs,
                                              bool need_dh, bool need_dk, bool need_dc,
                                              bool need_dv, int64_t tile_elements);

}  // namespace noprop
