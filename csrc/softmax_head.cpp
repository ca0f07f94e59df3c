// The softmax-embedding head on the CPU: the twin of kernels/softmax_head.py, any D and d.
//
//   o = softmax(h k^T + c) v      h [B, N, D], k [B, m, D], c [B, m] or None, v [m, d] -> [B, N, d]
//
// The logits [B, N, m] never exist whole: they are computed in tiles of about tile_elements (4 MB
// at the default 2^20) of `rows` rows by `classes` classes of one block, or of several whole
// blocks when a block's N m logits fit. A tile holds all N rows when it can (classes = tile / N),
// so that the large operands (k, v and their gradients, m rows each) are read once per block, and
// only the small ones (h, dO, o, dh: N rows) once per class chunk. Per tile, in fp32, as the
// Triton kernels do:
//
//   S = h k_chunk^T + c_chunk (ATen's baddbmm);  mx' = max(mx, rowmax S);  alpha = exp(mx - mx')
//   P = exp(S - mx');  l = alpha l + rowsum P;  o = alpha o + P v_chunk;  mx = mx'
//   after the last chunk: o = o / l,  lse = mx + log l                  (the online softmax)
//
// The backward recomputes S per tile from h, k, c and lse, class chunks outside, rows inside (but
// when one tile holds all B N m logits, the forward hands its P over instead):
//
//   P = exp(S - lse);  Delta = rowsum(dO * O);  dP = dO v^T;  dS = P * (dP - Delta)
//   dh += dS k_chunk;  dk_chunk += dS^T h;  dc_chunk += colsum dS;  dv_chunk += P^T dO
//
// Products go to ATen (its BLAS is multithreaded); the elementwise passes (max / exp / sum, dS and
// colsum) are OpenMP loops over rows or (block, column strip) tasks, summing in a fixed order.
// fp16 and bf16 inputs are widened to fp32 a tile (h) or a block (k, c) at a time, and the
// gradients cast once. o is returned in fp32: the backward's Delta needs it unrounded (see the
// Triton file's docstring), the Python side casts the copy it hands out.
#include "common.h"
#include "ops.h"

#include <cmath>
#include <limits>
#include <vector>

namespace noprop {
namespace {

constexpr int64_t kColumnStrip = 1024;  // columns of dS per backward task

at::Tensor widened(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
}

// t.narrow(dim, start, length), or t itself when that is all of it: at the engine's sizes one tile
// holds everything, and each narrow is a dispatcher call (about a microsecond).
at::Tensor part(const at::Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return start == 0 && length == t.size(dim) ? t : t.narrow(dim, start, length);
}

// How the [B, N, m] logits are cut: tiles of `rows` x `classes` of one block, or `blocks` whole
// blocks together when a block's N m logits fit in tile_elements. All N rows when the classes can
// still come in chunks of kMinClasses or more (past N = 65536 rows at the default size).
constexpr int64_t kMinClasses = 16;

struct TilePlan {
  int64_t blocks, rows, classes;
};

bool one_tile(const TilePlan& plan, int64_t B, int64_t N, int64_t m) {
  return plan.blocks == B && plan.rows == N && plan.classes == m;
}

TilePlan plan_tiles(int64_t B, int64_t N, int64_t m, int64_t tile_elements) {
  const int64_t classes = std::clamp<int64_t>(tile_elements / N, std::min(m, kMinClasses), m);
  const int64_t rows = std::clamp<int64_t>(tile_elements / classes, 1, N);
  const bool whole_blocks = rows == N && classes == m;
  return {whole_blocks ? std::clamp<int64_t>(tile_elements / (N * m), 1, B) : 1, rows, classes};
}

// S = h_tile k^T + c over nb blocks: s [nb, r, m], h_tile [nb, r, D], keys [nb, m, D], bias [nb, m]
void logits_into(at::Tensor& s, const at::Tensor& h_tile, const at::Tensor& keys,
                 const at::Tensor& bias) {
  if (bias.defined()) {
    at::baddbmm_out(s, bias.unsqueeze(1), h_tile, keys.transpose(1, 2));
  } else {
    at::bmm_out(s, h_tile, keys.transpose(1, 2));
  }
}

// The row passes below work on blocks of rows of about kRowBlock logits (16 KB, in L1), and take
// the exps as one flat loop over the block: it vectorises whatever m is (a per-row loop over m = 10
// classes would run mostly in its scalar remainder).
constexpr int64_t kRowBlock = 4096;
// Rows shorter than this are reduced by a plain loop: a vector reduction's remainder and final
// horizontal step cost more than such a row (2x slower at m = 10).
constexpr int64_t kShortRow = 32;

NOPROP_ALWAYS_INLINE float row_max_from(const float* x, int64_t n, float top) {
  if (n < kShortRow) {
    for (int64_t j = 0; j < n; ++j) top = x[j] > top ? x[j] : top;
    return top;
  }
#pragma omp simd reduction(max : top)
  for (int64_t j = 0; j < n; ++j) top = x[j] > top ? x[j] : top;
  return top;
}

NOPROP_ALWAYS_INLINE float row_sum(const float* x, int64_t n) {
  float total = 0.0f;
  if (n < kShortRow) {
    for (int64_t j = 0; j < n; ++j) total += x[j];
    return total;
  }
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) total += x[j];
  return total;
}

// Rows [begin, end) of one class chunk s [rows, mc] of the online softmax:
//   mx' = max(mx, rowmax s),  alpha = exp(mx - mx') (0 on the first chunk, where mx = -inf),
//   s <- exp(s - mx'),  l <- alpha l + rowsum s.
// A row whose classes so far are all masked (-inf logits) has mx' = -inf: it is shifted by 0
// instead, so that its exps are exp(-inf) = 0, not exp(-inf + inf) = NaN.
NOPROP_VECTOR_CLONES
void online_softmax_rows(float* s, int64_t mc, int64_t begin, int64_t end, float* row_max,
                         float* running_sum, float* alpha) {
  const int64_t rows_per_block = std::max<int64_t>(1, kRowBlock / mc);
  for (int64_t first = begin; first < end; first += rows_per_block) {
    const int64_t last = std::min(end, first + rows_per_block);
    for (int64_t row = first; row < last; ++row) {
      float* x = s + row * mc;
      const float top = row_max_from(x, mc, row_max[row]);
      const float shift = top == -std::numeric_limits<float>::infinity() ? 0.0f : top;
#pragma omp simd
      for (int64_t j = 0; j < mc; ++j) x[j] -= shift;
      alpha[row] = exp_fast(row_max[row] - shift);
      row_max[row] = top;
    }
    float* block = s + first * mc;
#pragma omp simd
    for (int64_t i = 0; i < (last - first) * mc; ++i) block[i] = exp_fast(block[i]);
    for (int64_t row = first; row < last; ++row) {
      running_sum[row] = alpha[row] * running_sum[row] + row_sum(s + row * mc, mc);
    }
  }
}

// Rows [begin, end) of s [rows, m]: s <- exp(s - lse[row]), the probabilities.
NOPROP_VECTOR_CLONES
void probs_rows(float* s, int64_t m, int64_t begin, int64_t end, const float* lse) {
  const int64_t rows_per_block = std::max<int64_t>(1, kRowBlock / m);
  for (int64_t first = begin; first < end; first += rows_per_block) {
    const int64_t last = std::min(end, first + rows_per_block);
    for (int64_t row = first; row < last; ++row) {
      float* x = s + row * m;
      const float shift = lse[row];
#pragma omp simd
      for (int64_t j = 0; j < m; ++j) x[j] -= shift;
    }
    float* block = s + first * m;
#pragma omp simd
    for (int64_t i = 0; i < (last - first) * m; ++i) block[i] = exp_fast(block[i]);
  }
}

// One (block, column strip) of a tile whose rows are m apart: dP <- dS = P (dP - Delta) over its
// r rows, and dc[cols] += colsum dS in row order (dc may be null).
NOPROP_VECTOR_CLONES
void grad_logits_strip(const float* p, float* dp, const float* delta, float* dc, int64_t r,
                       int64_t m, int64_t cols) {
  for (int64_t row = 0; row < r; ++row) {
    const float* prob = p + row * m;
    float* grad = dp + row * m;
    const float shift = delta[row];
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) grad[j] = prob[j] * (grad[j] - shift);
    if (dc != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < cols; ++j) dc[j] += grad[j];
    }
  }
}

}  // namespace

std::vector<at::Tensor> softmax_head_forward(const at::Tensor& h, const at::Tensor& k,
                                             const std::optional<at::Tensor>& c,
                                             const at::Tensor& v, int64_t tile_elements) {
  const int64_t B = h.size(0), N = h.size(1), m = v.size(0), d = v.size(1);
  const TilePlan plan = plan_tiles(B, N, m, tile_elements);
  at::Tensor o = at::empty({B, N, d}, h.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({B, N}, o.options());
  const at::Tensor values = widened(v);
  at::Tensor tile = at::empty({plan.blocks * plan.rows * plan.classes}, o.options());
  std::vector<float> row_sum(plan.blocks * plan.rows), alpha(plan.blocks * plan.rows);
  for (int64_t b0 = 0; b0 < B; b0 += plan.blocks) {
    const int64_t nb = std::min(plan.blocks, B - b0);
    const at::Tensor keys = widened(part(k, 0, b0, nb));
    const at::Tensor bias = c.has_value() ? widened(part(*c, 0, b0, nb)) : at::Tensor();
    for (int64_t n0 = 0; n0 < N; n0 += plan.rows) {
      const int64_t r = std::min(plan.rows, N - n0), rows = nb * r;
      // nb == 1 or r == N: the tile's rows of o and lse are contiguous from (b0, n0)
      const int64_t first_row = b0 * N + n0;
      const at::Tensor h_tile = widened(part(part(h, 0, b0, nb), 1, n0, r));
      at::Tensor o_rows = part(o.view({B * N, d}), 0, first_row, rows);
      float* out = o_rows.data_ptr<float>();
      float* row_max = lse.data_ptr<float>() + first_row;  // the running max, then lse
      std::fill(row_max, row_max + rows, -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.begin() + rows, 0.0f);
      for (int64_t j0 = 0; j0 < m; j0 += plan.classes) {
        const int64_t mc = std::min(plan.classes, m - j0);
        at::Tensor s = part(tile, 0, 0, rows * mc).view({nb, r, mc});
        logits_into(s, h_tile, part(keys, 1, j0, mc),
                    bias.defined() ? part(bias, 1, j0, mc) : bias);
        float* probs = s.data_ptr<float>();
        at::parallel_for(0, rows, grain_for(mc), [&](int64_t begin, int64_t end) {
          online_softmax_rows(probs, mc, begin, end, row_max, row_sum.data(), alpha.data());
        });
        const at::Tensor probs_rows = s.view({rows, mc}), values_chunk = part(values, 0, j0, mc);
        if (j0 == 0) {
          at::mm_out(o_rows, probs_rows, values_chunk);  // o = P v
        } else {  // o = alpha o + P v
          at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
            for (int64_t row = begin; row < end; ++row) {
              for (int64_t j = 0; j < d; ++j) out[row * d + j] *= alpha[row];
            }
          });
          o_rows.addmm_(probs_rows, values_chunk);
        }
      }
      at::parallel_for(0, rows, grain_for(d), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {  // o /= l, lse = mx + log l
          const float inv_sum = 1.0f / row_sum[row];
          for (int64_t j = 0; j < d; ++j) out[row * d + j] *= inv_sum;
          row_max[row] += log_positive(row_sum[row]);
        }
      });
    }
  }
  if (!one_tile(plan, B, N, m)) return {o, lse, at::Tensor()};
  // The tile holds every probability: normalise it and hand it to the backward, which then need not
  // recompute the logits (a product as large as the forward's); it is at most tile_elements.
  float* probs = tile.data_ptr<float>();
  at::parallel_for(0, B * N, grain_for(m), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float inv_sum = 1.0f / row_sum[row];
      for (int64_t j = 0; j < m; ++j) probs[row * m + j] *= inv_sum;
    }
  });
  return {o, lse, tile.view({B, N, m})};
}

std::vector<at::Tensor> softmax_head_backward(const at::Tensor& grad_o, const at::Tensor& h,
                                              const at::Tensor& k,
                                              const std::optional<at::Tensor>& c,
                                              const at::Tensor& v, const at::Tensor& o,
                                              const at::Tensor& lse,
                                              const std::optional<at::Tensor>& saved_probs,
                                              bool need_dh, bool need_dk, bool need_dc,
                                              bool need_dv, int64_t tile_elements) {
  const int64_t B = h.size(0), N = h.size(1), D = h.size(2), m = v.size(0), d = v.size(1);
  const bool fp32 = h.scalar_type() == at::kFloat;
  need_dc = need_dc && c.has_value();
  const bool need_ds = need_dh || need_dk || need_dc;
  const TilePlan plan = plan_tiles(B, N, m, tile_elements);
  const at::TensorOptions f32 = lse.options();
  const at::Tensor upstream = widened(grad_o).contiguous();  // dO [B, N, d] fp32
  const at::Tensor values = widened(v);

  // Delta = rowsum(dO * O) [B N], once for all tiles
  at::Tensor delta = at::empty({B * N}, f32);
  {
    const float* g = upstream.data_ptr<float>();
    const float* out = o.data_ptr<float>();
    float* dst = delta.data_ptr<float>();
    at::parallel_for(0, B * N, grain_for(d), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        float total = 0.0f;
        for (int64_t j = 0; j < d; ++j) total += g[row * d + j] * out[row * d + j];
        dst[row] = total;
      }
    });
  }

  // fp32 accumulators, the outputs themselves for fp32 inputs: dh sums over class chunks, dk over
  // row tiles (both overwritten by their first term: no zero-fill pass), dc and dv (small) over
  // row tiles, and dv also over blocks
  at::Tensor dh = need_dh ? at::empty(h.sizes(), f32) : at::Tensor();
  at::Tensor dk = need_dk ? at::empty_like(k) : at::Tensor();
  at::Tensor dc = need_dc ? (fp32 ? at::zeros_like(*c) : at::empty_like(*c)) : at::Tensor();
  at::Tensor dv = need_dv ? at::zeros({m, d}, f32) : at::Tensor();
  const int64_t tile_numel = plan.blocks * plan.rows * plan.classes;
  const bool recompute = !saved_probs.has_value();  // else one tile, P saved by the forward
  at::Tensor probs_tile = recompute ? at::empty({tile_numel}, f32) : saved_probs->view({-1});
  at::Tensor grad_tile = need_ds ? at::empty({tile_numel}, f32) : at::Tensor();

  for (int64_t b0 = 0; b0 < B; b0 += plan.blocks) {
    const int64_t nb = std::min(plan.blocks, B - b0);
    const at::Tensor keys = widened(part(k, 0, b0, nb));
    const at::Tensor bias = c.has_value() ? widened(part(*c, 0, b0, nb)) : at::Tensor();
    at::Tensor dk_acc, dc_acc;
    if (need_dk) dk_acc = fp32 ? part(dk, 0, b0, nb) : at::empty({nb, m, D}, f32);
    if (need_dc) dc_acc = fp32 ? part(dc, 0, b0, nb) : at::zeros({nb, m}, f32);
    for (int64_t j0 = 0; j0 < m; j0 += plan.classes) {  // class chunks outside: k, v read once
      const int64_t mc = std::min(plan.classes, m - j0);
      const at::Tensor keys_chunk = part(keys, 1, j0, mc);
      const at::Tensor bias_chunk = bias.defined() ? part(bias, 1, j0, mc) : bias;
      const at::Tensor values_chunk = part(values, 0, j0, mc);
      for (int64_t n0 = 0; n0 < N; n0 += plan.rows) {
        const int64_t r = std::min(plan.rows, N - n0), rows = nb * r;
        const int64_t first_row = b0 * N + n0;  // nb == 1 or r == N: the tile's rows are contiguous
        const at::Tensor h_tile = widened(part(part(h, 0, b0, nb), 1, n0, r));
        const at::Tensor grad_rows = part(upstream.view({B * N, d}), 0, first_row, rows);
        at::Tensor p = part(probs_tile, 0, 0, rows * mc).view({nb, r, mc});
        float* probs = p.data_ptr<float>();
        if (recompute) {
          logits_into(p, h_tile, keys_chunk, bias_chunk);
          const float* tile_lse = lse.data_ptr<float>() + first_row;
          at::parallel_for(0, rows, grain_for(mc), [&](int64_t begin, int64_t end) {
            probs_rows(probs, mc, begin, end, tile_lse);
          });
        }
        if (need_dv) part(dv, 0, j0, mc).addmm_(p.view({rows, mc}).t(), grad_rows);  // P^T dO
        if (!need_ds) continue;

        at::Tensor ds = part(grad_tile, 0, 0, rows * mc).view({nb, r, mc});
        at::Tensor ds_rows = ds.view({rows, mc});
        at::mm_out(ds_rows, grad_rows, values_chunk.t());  // dP = dO v^T; dS overwrites it below
        float* grads = ds.data_ptr<float>();
        const float* tile_delta = delta.data_ptr<float>() + first_row;
        float* dc_base = need_dc ? dc_acc.data_ptr<float>() + j0 : nullptr;
        const int64_t strips = (mc + kColumnStrip - 1) / kColumnStrip;
        const int64_t grain = grain_for(r * kColumnStrip);
        at::parallel_for(0, nb * strips, grain, [&](int64_t begin, int64_t end) {
          for (int64_t task = begin; task < end; ++task) {
            const int64_t block = task / strips, col0 = (task - block * strips) * kColumnStrip;
            const int64_t offset = block * r * mc + col0;
            grad_logits_strip(probs + offset, grads + offset, tile_delta + block * r,
                              dc_base != nullptr ? dc_base + block * m + col0 : nullptr, r, mc,
                              std::min(kColumnStrip, mc - col0));
          }
        });
        if (need_dh) {  // dh (+)= dS k; beta = 0 ignores the uninitialised values
          part(dh.view({B * N, D}), 0, first_row, rows).view({nb, r, D})
              .baddbmm_(ds, keys_chunk, /*beta=*/j0 == 0 ? 0 : 1);
        }
        if (need_dk) {  // dk (+)= dS^T h
          part(dk_acc, 1, j0, mc).baddbmm_(ds.transpose(1, 2), h_tile, /*beta=*/n0 == 0 ? 0 : 1);
        }
      }
    }
    if (!fp32 && need_dk) part(dk, 0, b0, nb).copy_(dk_acc);
    if (!fp32 && need_dc) part(dc, 0, b0, nb).copy_(dc_acc);
  }
  if (!fp32) {
    if (need_dh) dh = dh.to(h.scalar_type());
    if (need_dv) dv = dv.to(h.scalar_type());
  }
  return {dh, dk, dc, dv};
}

}  // namespace noprop
