// Noise injection on the CPU: the twin of kernels/noise.py (same noise, same contract).
//
//   z[b, n, j] = a[b, n] W[y[n], j] + s[b, n] eps[b, n, j]
//   eps[b, n, j] = randn(seed, offset + i),  i = (b N + n) d + j   (the flat index of z; mod 2^64)
//   dW[k, :]   = sum_{n : y[n] = k} sum_b a[b, n] dz[b, n, :]
//   da[b, n]   = sum_j dz[b, n, j] W[y[n], j],   ds[b, n] = sum_j dz[b, n, j] eps[b, n, j]
//
// a and s arrive as [B, N] views: a per-block scale [B] has stride 0 over n (a[b, n] = a[b]).
// z is produced in chunks of kNoiseChunk consecutive elements, one per task: the normals of the
// chunk into an fp32 buffer (philox.h, vectorised), then one pass combines them into z.
// The backward computes only the gradients asked for and is deterministic: dW sums over b per
// label row, rows in parallel, then dW[y[n]] += in the order of n with each thread owning a band of
// columns (no atomics); da and ds give each task whole rows (b, n), draw eps again for them in
// chunks, and sum every row in the order of j; so all three are bitwise the same for any thread
// count.
#include "common.h"
#include "ops.h"
#include "philox.h"

#include <vector>

namespace noprop {
namespace {

constexpr int64_t kNoiseChunk = 1024;  // normals per task (a 4 KB buffer): a multiple of the strip

// eps[i] = randn(seed, first + i) for i < count; eps holds count rounded up to kPhiloxStrip.
NOPROP_VECTOR_CLONES
void draw_normals(uint64_t seed, uint64_t first, int64_t count, float* eps) {
  for (int64_t start = 0; start < count; start += kPhiloxStrip) {
    philox_randn_strip(seed, first + static_cast<uint64_t>(start), eps + start);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// y[n] in [0, m): a label outside would read or write outside W.
void check_labels(const at::Tensor& y, int64_t num_classes) {
  const int64_t* labels = y.data_ptr<int64_t>();
  for (int64_t n = 0; n < y.numel(); ++n) {
    TORCH_CHECK_INDEX(labels[n] >= 0 && labels[n] < num_classes, "noise_injection: label ",
                      labels[n], " at position ", n, " is outside [0, ", num_classes, ")");
  }
}

}  // namespace

at::Tensor philox_randn(int64_t seed, int64_t offset, int64_t numel) {
  TORCH_CHECK(numel >= 0, "philox_randn: numel must be >= 0, got ", numel);
  at::Tensor out = at::empty({numel}, at::kFloat);
  float* values = out.data_ptr<float>();
  at::parallel_for(0, ceil_div(numel, kNoiseChunk), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> eps(kNoiseChunk);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * kNoiseChunk, count = std::min(kNoiseChunk, numel - first);
      draw_normals(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset) + first, count,
                   eps.data());
      std::copy(eps.data(), eps.data() + count, values + first);
    }
  });
  return out;
}

at::Tensor noise_forward(const at::Tensor& y, const at::Tensor& W, const at::Tensor& a,
                         const at::Tensor& s, const at::Tensor& seed, const at::Tensor& offset) {
  const int64_t B = a.size(0), N = y.size(0), m = W.size(0), d = W.size(1);
  check_labels(y, m);
  at::Tensor z = at::empty({B, N, d}, W.options());
  const int64_t total = z.numel();
  if (total == 0) return z;
  // int64 -> uint64 keeps the bits: two's complement, as triton's seed.to(uint64)
  const uint64_t seed_bits = static_cast<uint64_t>(seed.item<int64_t>());
  const uint64_t offset_bits = static_cast<uint64_t>(offset.item<int64_t>());
  const int64_t* labels = y.data_ptr<int64_t>();
  const float* input_scale = a.data_ptr<float>();
  const float* noise_scale = s.data_ptr<float>();
  const int64_t a_block = a.stride(0), a_example = a.stride(1);
  const int64_t s_block = s.stride(0), s_example = s.stride(1);
  NOPROP_DISPATCH_FLOATS(W.scalar_type(), "noise_forward", [&] {
    const scalar_t* embed = W.data_ptr<scalar_t>();
    scalar_t* out = z.data_ptr<scalar_t>();
    at::parallel_for(0, ceil_div(total, kNoiseChunk), 1, [&](int64_t begin, int64_t end) {
      std::vector<float> eps(kNoiseChunk);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * kNoiseChunk, stop = std::min(total, first + kNoiseChunk);
        draw_normals(seed_bits, offset_bits + static_cast<uint64_t>(first), stop - first,
                     eps.data());
        // walk the rows (b, n) of z that overlap [first, stop): row = b N + n
        for (int64_t i = first; i < stop;) {
          const int64_t row = i / d, row_end = std::min(stop, (row + 1) * d);
          const int64_t b = row / N, n = row - b * N;
          const scalar_t* u = embed + labels[n] * d + (i - row * d);  // W[y[n], j], j = i - row d
          const float* noise = eps.data() + (i - first);
          const float scale = input_scale[b * a_block + n * a_example];
          const float sigma = noise_scale[b * s_block + n * s_example];
          scalar_t* dst = out + i;
          for (int64_t t = 0; t < row_end - i; ++t) {
            dst[t] = from_float<scalar_t>(scale * to_float(u[t]) + sigma * noise[t]);
          }
          i = row_end;
        }
      }
    });
  });
  return z;
}

namespace {

// dW [m, d] fp32 = sum over n of g[n] at row y[n], g[n] = sum_b a[b, n] dz[b, n]
template <typename scalar_t>
void embedding_grad(const scalar_t* upstream, const int64_t* labels, const at::Tensor& a,
                    int64_t B, int64_t N, int64_t d, float* dw) {
  at::Tensor per_label = at::empty({N, d}, at::kFloat);
  float* g = per_label.data_ptr<float>();
  const float* input_scale = a.data_ptr<float>();
  const int64_t a_block = a.stride(0), a_example = a.stride(1);
  at::parallel_for(0, N, grain_for(B * d), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      float* row = g + n * d;
      std::fill(row, row + d, 0.0f);
      for (int64_t b = 0; b < B; ++b) {
        const scalar_t* src = upstream + (b * N + n) * d;
        const float scale = input_scale[b * a_block + n * a_example];
        for (int64_t j = 0; j < d; ++j) row[j] += scale * to_float(src[j]);
      }
    }
  });
  // dW[y[n]] += g[n] for n = 0, 1, ...: every element sums its terms in the order of n
  at::parallel_for(0, d, grain_for(N), [&](int64_t col_begin, int64_t col_end) {
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dw + labels[n] * d;
      const float* src = g + n * d;
      for (int64_t j = col_begin; j < col_end; ++j) dst[j] += src[j];
    }
  });
}

// da[row] = sum_j dz[row, j] W[y[n], j] (need_da) and ds[row] = sum_j dz[row, j] eps[row, j]
// (need_ds) for the rows row = b N + n of dz; each task owns whole rows and draws their noise in
// chunks of kNoiseChunk, so every row is summed in the order of j, whatever the split.
template <typename scalar_t>
void scale_grads(const scalar_t* upstream, const int64_t* labels, const scalar_t* embed,
                 uint64_t seed_bits, uint64_t offset_bits, int64_t rows, int64_t N, int64_t d,
                 float* da, float* ds) {
  at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
    std::vector<float> eps(ds != nullptr ? kNoiseChunk : 0);
    const int64_t stop = end * d;  // the flat range [begin d, end d) of this task's rows
    for (int64_t first = begin * d; first < stop; first += kNoiseChunk) {
      const int64_t chunk_end = std::min(stop, first + kNoiseChunk);
      if (ds != nullptr) {
        draw_normals(seed_bits, offset_bits + static_cast<uint64_t>(first), chunk_end - first,
                     eps.data());
      }
      for (int64_t i = first; i < chunk_end;) {  // the rows overlapping [first, chunk_end)
        const int64_t row = i / d, j0 = i - row * d, row_end = std::min(chunk_end, (row + 1) * d);
        const scalar_t* g = upstream + i;
        if (da != nullptr) {
          const scalar_t* u = embed + labels[row % N] * d + j0;
          float total = j0 == 0 ? 0.0f : da[row];  // a row split between chunks goes on in order
          for (int64_t t = 0; t < row_end - i; ++t) total += to_float(g[t]) * to_float(u[t]);
          da[row] = total;
        }
        if (ds != nullptr) {
          const float* noise = eps.data() + (i - first);
          float total = j0 == 0 ? 0.0f : ds[row];
          for (int64_t t = 0; t < row_end - i; ++t) total += to_float(g[t]) * noise[t];
          ds[row] = total;
        }
        i = row_end;
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> noise_backward(const at::Tensor& dz, const at::Tensor& y,
                                       const at::Tensor& a, int64_t num_classes,
                                       const std::optional<at::Tensor>& W,
                                       const std::optional<at::Tensor>& seed,
                                       const std::optional<at::Tensor>& offset, bool need_dw) {
  const int64_t B = dz.size(0), N = dz.size(1), d = dz.size(2), m = num_classes;
  const bool need_da = W.has_value(), need_ds = seed.has_value() && offset.has_value();
  check_labels(y, m);
  at::Tensor grad_w = need_dw ? at::zeros({m, d}, at::kFloat) : at::Tensor();
  at::Tensor grad_a = need_da ? at::zeros({B, N}, at::kFloat) : at::Tensor();
  at::Tensor grad_s = need_ds ? at::zeros({B, N}, at::kFloat) : at::Tensor();
  if (dz.numel() == 0) return {grad_w, grad_a, grad_s};
  const int64_t* labels = y.data_ptr<int64_t>();
  NOPROP_DISPATCH_FLOATS(dz.scalar_type(), "noise_backward", [&] {
    const scalar_t* upstream = dz.data_ptr<scalar_t>();
    if (need_dw) embedding_grad(upstream, labels, a, B, N, d, grad_w.data_ptr<float>());
    if (need_da || need_ds) {
      const uint64_t seed_bits = need_ds ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
      const uint64_t offset_bits = need_ds ? static_cast<uint64_t>(offset->item<int64_t>()) : 0;
      const scalar_t* embed = need_da ? W->data_ptr<scalar_t>() : nullptr;
      scale_grads(upstream, labels, embed, seed_bits, offset_bits, B * N, N, d,
                  need_da ? grad_a.data_ptr<float>() : nullptr,
                  need_ds ? grad_s.data_ptr<float>() : nullptr);
    }
  });
  return {grad_w, grad_a, grad_s};
}

}  // namespace noprop
