// Noise injection on the CPU: the twin of kernels/noise.py (same noise, same contract).
//
//   z[b, n, j] = a[b] W[y[n], j] + s[b] eps[b, n, j],   eps[b, n, j] = randn(seed, offset + i)
//   i = (b N + n) d + j                                   (the flat index of z; int64, mod 2^64)
//   dW[k, :]   = sum_{n : y[n] = k} sum_b a[b] dz[b, n, :]
//
// z is produced in chunks of kNoiseChunk consecutive elements, one per task: the normals of the
// chunk into an fp32 buffer (philox.h, vectorised), then one pass combines them into z.
// The backward is deterministic: the sum over b per label row, rows in parallel, then dW[y[n]] +=
// in the order of n with each thread owning a band of columns (no atomics), so dW is bitwise the
// same for any thread count.
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
          const float scale = input_scale[b], sigma = noise_scale[b];
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

at::Tensor noise_backward(const at::Tensor& dz, const at::Tensor& y, const at::Tensor& a,
                          int64_t num_classes) {
  const int64_t B = dz.size(0), N = dz.size(1), d = dz.size(2);
  check_labels(y, num_classes);
  at::Tensor grad_w = at::zeros({num_classes, d}, at::kFloat);
  if (dz.numel() == 0) return grad_w;
  at::Tensor per_label = at::empty({N, d}, at::kFloat);  // g[n] = sum_b a[b] dz[b, n]
  const int64_t* labels = y.data_ptr<int64_t>();
  const float* input_scale = a.data_ptr<float>();
  float* g = per_label.data_ptr<float>();
  float* dw = grad_w.data_ptr<float>();
  NOPROP_DISPATCH_FLOATS(dz.scalar_type(), "noise_backward", [&] {
    const scalar_t* upstream = dz.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_for(B * d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        float* row = g + n * d;
        std::fill(row, row + d, 0.0f);
        for (int64_t b = 0; b < B; ++b) {
          const scalar_t* src = upstream + (b * N + n) * d;
          const float scale = input_scale[b];
          for (int64_t j = 0; j < d; ++j) row[j] += scale * to_float(src[j]);
        }
      }
    });
  });
  // dW[y[n]] += g[n] for n = 0, 1, ...: every element sums its terms in the order of n
  at::parallel_for(0, d, grain_for(N), [&](int64_t col_begin, int64_t col_end) {
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dw + labels[n] * d;
      const float* src = g + n * d;
      for (int64_t j = col_begin; j < col_end; ++j) dst[j] += src[j];
    }
  });
  return grad_w;
}

}  // namespace noprop
