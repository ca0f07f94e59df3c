// The batched multi-block linear layer on the CPU: the twin of kernels/block_linear.py.
//
//   Y[b] = X[b] W[b]^T + bias[b]         X [B, N, K], W [B, M, K], bias [B, M] or None
//   dX[b] = dY[b] W[b],   dW[b] = dY[b]^T X[b],   dbias[b] = sum_n dY[b, n, :]
//
// The products are ATen's bmm (MKL / oneDNN), in fp32: fp16 and bf16 operands are widened first,
// so that each output is rounded once, after the bias. One epilogue pass adds the bias (or only
// casts); one backward pass sums dbias and, for fp16 / bf16, writes G = dY widened to fp32, over
// (block, column strip) tasks walking down the rows, so dbias is bitwise reproducible.
#include "common.h"
#include "ops.h"

namespace noprop {
namespace {

constexpr int64_t kColumnStrip = 256;  // columns of G per backward task (a 1 KB accumulator)

at::Tensor widened(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// y[row] = acc[row] + bias[b] for rows [begin, end) of the [B N, M] product acc (fp32); bias may
// be null. The test is a loop invariant: -O3 unswitches the loop into one version each.
template <typename scalar_t>
void epilogue_rows(const float* acc, const scalar_t* bias, scalar_t* y, int64_t N, int64_t M,
                   int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const float* src = acc + row * M;
    const scalar_t* shift = bias != nullptr ? bias + (row / N) * M : nullptr;
    scalar_t* dst = y + row * M;
    for (int64_t j = 0; j < M; ++j) {
      float value = src[j];
      if (shift != nullptr) value += to_float(shift[j]);
      dst[j] = from_float<scalar_t>(value);
    }
  }
}

// Block b, columns [col0, col0 + cols): G = dY in fp32, written to g unless it is null;
// dbias = sum over the rows of dY unless it is null.
template <typename scalar_t>
void bias_grad_strip(const scalar_t* dy, float* g, scalar_t* dbias, int64_t b, int64_t col0,
                     int64_t cols, int64_t N, int64_t M) {
  float acc[kColumnStrip] = {};
  for (int64_t n = 0; n < N; ++n) {
    const int64_t offset = (b * N + n) * M + col0;
    for (int64_t j = 0; j < cols; ++j) {
      const float value = to_float(dy[offset + j]);
      if (g != nullptr) g[offset + j] = value;
      acc[j] += value;
    }
  }
  if (dbias != nullptr) {
    for (int64_t j = 0; j < cols; ++j) dbias[b * M + col0 + j] = from_float<scalar_t>(acc[j]);
  }
}

}  // namespace

at::Tensor block_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  const bool fp32 = x.scalar_type() == at::kFloat;
  at::Tensor acc = at::bmm(widened(x), widened(weight).transpose(1, 2));  // [B, N, M] fp32
  if (fp32 && !bias.has_value()) return acc;
  const int64_t N = x.size(1), M = weight.size(1), rows = x.size(0) * N;
  at::Tensor y = fp32 ? acc : at::empty(acc.sizes(), x.options());  // fp32: in place
  NOPROP_DISPATCH_FLOATS(x.scalar_type(), "block_linear_forward", [&] {
    const float* src = acc.data_ptr<float>();
    const scalar_t* shift = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    scalar_t* dst = y.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_for(M), [&](int64_t begin, int64_t end) {
      epilogue_rows(src, shift, dst, N, M, begin, end);
    });
  });
  return y;
}

std::vector<at::Tensor> block_linear_backward(const at::Tensor& dy_in, const at::Tensor& x,
                                              const at::Tensor& weight, bool need_dx,
                                              bool need_dw, bool need_dbias) {
  const int64_t B = x.size(0), N = x.size(1), M = weight.size(1);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const at::Tensor dy = dy_in.contiguous();
  // G = dY in fp32: dY itself when there is nothing to widen
  const bool write_g = !fp32 && (need_dx || need_dw);
  at::Tensor g = write_g ? at::empty(dy.sizes(), dy.options().dtype(at::kFloat)) : dy;
  at::Tensor dbias = need_dbias ? at::empty({B, M}, x.options()) : at::Tensor();
  if (write_g || need_dbias) {
    NOPROP_DISPATCH_FLOATS(x.scalar_type(), "block_linear_backward", [&] {
      const scalar_t* upstream = dy.data_ptr<scalar_t>();
      float* g_out = write_g ? g.data_ptr<float>() : nullptr;
      scalar_t* dbias_out = need_dbias ? dbias.data_ptr<scalar_t>() : nullptr;
      const int64_t strips = (M + kColumnStrip - 1) / kColumnStrip;
      at::parallel_for(0, B * strips, grain_for(N * kColumnStrip), [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / strips, col0 = (task - b * strips) * kColumnStrip;
          bias_grad_strip(upstream, g_out, dbias_out, b, col0, std::min(kColumnStrip, M - col0),
                          N, M);
        }
      });
    });
  }
  at::Tensor dx, dw;
  if (need_dx) dx = at::bmm(g, widened(weight));  // [B, N, M] @ [B, M, K]
  if (need_dw) dw = at::bmm(g.transpose(1, 2), widened(x));  // [B, M, N] @ [B, N, K]
  if (!fp32) {
    if (need_dx) dx = dx.to(x.scalar_type());
    if (need_dw) dw = dw.to(x.scalar_type());
  }
  return {dx, dw, dbias};
}

}  // namespace noprop
