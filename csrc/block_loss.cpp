// The weighted per-block denoising losses on the CPU: the twin of kernels/block_loss.py.
//
//   losses[b] = (1 / N) sum_n w[b, n] sum_j (u_hat[b, n, j] - u[n, j])^2         -> [B] fp32
//   d u_hat[b, i] = c[b, n] (u_hat[b, i] - u[i]),   d u[i] = - sum_b c[b, n] (u_hat[b, i] - u[i])
//   c[b, n] = dL[b] w[b, n] 2 / N,   i = n d + j                  (u_hat seen as [B, M], M = N d)
//   dw[b, n] = dL[b] (1 / N) sum_j (u_hat[b, n, j] - u[n, j])^2                  (when asked for)
//
// w is [B] (per block: w[b, n] = w[b]) or [B, N] (per example). Forward: each (block, chunk of
// about kLossChunk elements) sums its squared errors with SIMD lanes (per example: row by row, each
// row's sum times its weight); the chunks' sums are added in order in fp64. Backward: each strip of
// M reads u once and loops over the blocks, writing d u_hat and summing d u in fp32; dw sums each
// row (b, n) on its own. Fixed chunking and no atomics: bitwise reproducible for any thread count.
// Arithmetic in fp32, one cast on store.
#include "common.h"
#include "ops.h"

#include <vector>

namespace noprop {
namespace {

constexpr int64_t kLossChunk = 8192;  // elements per forward task
constexpr int64_t kGradStrip = 2048;  // elements of M per backward step (an 8 KB fp32 accumulator)

template <typename scalar_t>
float squared_error_sum(const scalar_t* pred, const scalar_t* target, int64_t count) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < count; ++i) {
    const float diff = to_float(pred[i]) - to_float(target[i]);
    total += diff * diff;
  }
  return total;
}

}  // namespace

at::Tensor block_loss_forward(const at::Tensor& u_hat, const at::Tensor& u, const at::Tensor& w) {
  const int64_t B = u_hat.size(0), N = u_hat.size(1), M = u.numel(), d = M / N;
  const bool per_example = w.dim() == 2;
  // per block: chunks of kLossChunk elements; per example: of whole rows, about as many elements
  const int64_t rows_per_chunk = std::max<int64_t>(1, kLossChunk / d);
  const int64_t chunks = per_example ? (N + rows_per_chunk - 1) / rows_per_chunk
                                     : (M + kLossChunk - 1) / kLossChunk;
  const float* weight = w.data_ptr<float>();
  std::vector<float> partial(B * chunks);
  NOPROP_DISPATCH_FLOATS(u_hat.scalar_type(), "block_loss_forward", [&] {
    const scalar_t* pred = u_hat.data_ptr<scalar_t>();
    const scalar_t* target = u.data_ptr<scalar_t>();
    at::parallel_for(0, B * chunks, grain_for(kLossChunk), [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / chunks, chunk = task - b * chunks;
        if (!per_example) {
          const int64_t start = chunk * kLossChunk;
          partial[task] = squared_error_sum(pred + b * M + start, target + start,
                                            std::min(kLossChunk, M - start));
          continue;
        }
        float total = 0.0f;  // sum over the chunk's rows n of w[b, n] ||u_hat[b, n] - u[n]||^2
        const int64_t first = chunk * rows_per_chunk, last = std::min(N, first + rows_per_chunk);
        for (int64_t n = first; n < last; ++n) {
          total += weight[b * N + n] * squared_error_sum(pred + b * M + n * d, target + n * d, d);
        }
        partial[task] = total;
      }
    });
  });
  at::Tensor losses = at::empty({B}, at::kFloat);
  for (int64_t b = 0; b < B; ++b) {
    double total = 0.0;
    for (int64_t c = 0; c < chunks; ++c) total += partial[b * chunks + c];
    const float scale = per_example ? 1.0f : weight[b];  // per example: weighted already
    losses.data_ptr<float>()[b] = static_cast<float>(total) / static_cast<float>(N) * scale;
  }
  return losses;
}

std::vector<at::Tensor> block_loss_backward(const at::Tensor& grad, const at::Tensor& u_hat,
                                            const at::Tensor& u, const at::Tensor& w,
                                            bool need_du_hat, bool need_du, bool need_dw) {
  const int64_t B = u_hat.size(0), N = u_hat.size(1), M = u.numel(), d = M / N;
  const bool per_example = w.dim() == 2;
  at::Tensor upstream = grad.to(at::kFloat).contiguous();  // dL of a .sum() is stride 0
  const float* dL = upstream.data_ptr<float>();
  const float* weight = w.data_ptr<float>();
  std::vector<float> coef(B);  // dL[b] 2 / N, times w[b] for per-block weights
  for (int64_t b = 0; b < B; ++b) {
    coef[b] = dL[b] * (per_example ? 1.0f : weight[b]) * 2.0f / static_cast<float>(N);
  }
  at::Tensor du_hat = need_du_hat ? at::empty_like(u_hat) : at::Tensor();
  at::Tensor du = need_du ? at::empty_like(u) : at::Tensor();
  at::Tensor dw = need_dw ? at::empty({B, N}, at::kFloat) : at::Tensor();
  NOPROP_DISPATCH_FLOATS(u_hat.scalar_type(), "block_loss_backward", [&] {
    const scalar_t* pred = u_hat.data_ptr<scalar_t>();
    const scalar_t* target = u.data_ptr<scalar_t>();
    if (need_dw) {  // dw[b, n] = dL[b] / N ||u_hat[b, n] - u[n]||^2, row by row
      float* out = dw.data_ptr<float>();
      at::parallel_for(0, B * N, grain_for(d), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          const int64_t b = row / N, n = row - b * N;
          out[row] = dL[b] / static_cast<float>(N) *
                     squared_error_sum(pred + b * M + n * d, target + n * d, d);
        }
      });
    }
    if (!need_du_hat && !need_du) return;
    scalar_t* pred_grad = need_du_hat ? du_hat.data_ptr<scalar_t>() : nullptr;
    scalar_t* target_grad = need_du ? du.data_ptr<scalar_t>() : nullptr;
    const int64_t strips = (M + kGradStrip - 1) / kGradStrip;
    at::parallel_for(0, strips, grain_for(B * kGradStrip), [&](int64_t begin, int64_t end) {
      float acc[kGradStrip];  // d u of the strip, summed over b in order
      for (int64_t strip = begin; strip < end; ++strip) {
        const int64_t start = strip * kGradStrip, count = std::min(kGradStrip, M - start);
        const scalar_t* t = target + start;
        std::fill(acc, acc + count, 0.0f);
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* p = pred + b * M + start;
          // runs of one coefficient: the whole strip per block, a row's part per example
          for (int64_t first = 0; first < count;) {
            const int64_t n = (start + first) / d;
            const int64_t last = per_example ? std::min(count, (n + 1) * d - start) : count;
            const float c = per_example ? coef[b] * weight[b * N + n] : coef[b];
            if (pred_grad != nullptr) {
              scalar_t* out = pred_grad + b * M + start;
              for (int64_t i = first; i < last; ++i) {
                const float g = c * (to_float(p[i]) - to_float(t[i]));
                out[i] = from_float<scalar_t>(g);
                acc[i] -= g;
              }
            } else {
              for (int64_t i = first; i < last; ++i) {
                acc[i] -= c * (to_float(p[i]) - to_float(t[i]));
              }
            }
            first = last;
          }
        }
        if (target_grad != nullptr) {
          for (int64_t i = 0; i < count; ++i) target_grad[start + i] = from_float<scalar_t>(acc[i]);
        }
      }
    });
  });
  return {du_hat, du, dw};
}

}  // namespace noprop
