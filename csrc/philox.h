// The noise generator: Philox-4x32-10 and the Box-Muller normal of triton 3.9.0's tl.randn, on
// the CPU.
//
// It reproduces kernels/noise.py's `philox_randn_ref` (the specification): the Philox integers
// bitwise, the normals to about an ulp (log_positive and cos_angle are evaluated in fp64 and
// rounded once; torch's and libdevice's fp32 log and cos are within an ulp).
//
//   counter (c0, c1, c2, c3) = (offset mod 2^32, offset / 2^32 mod 2^32, 0, 0)
//   key     (k0, k1)         = (seed mod 2^32, seed / 2^32 mod 2^32)        (two's complement)
//   10 rounds: (c0, c1, c2, c3) <- (hi(B c2) ^ c1 ^ k0, lo(B c2), hi(A c0) ^ c3 ^ k1, lo(A c0)),
//              then k0 += 0x9E3779B9, k1 += 0xBB67AE85 (mod 2^32)
//   uniform(x) = (x as int32, negatives folded by ~x) * 4.6566127342e-10        in [0, 1)
//   u1 = max(1e-7, uniform(c0)),  theta = 2 pi uniform(c1)                      (fp32)
//   randn = sqrt(-2 log u1) cos theta                                           (fp32)
//
// Everything is branch-free arithmetic on arrays of kPhiloxStrip counters, so that the compiler
// vectorises it (libm's scalar logf and cosf would cost more than the Philox rounds; the build's
// -fno-trapping-math lets GCC turn selects into vector blends). The callers are
// NOPROP_VECTOR_CLONES functions: this header's code is inlined into each clone.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_math.h"

namespace noprop {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u, kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u, kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int64_t kPhiloxStrip = 64;                // counters generated together
constexpr float kIntToUniform = 4.6566127342e-10f;  // largest scale with (2^31 - 1) scale < 1
constexpr float kTwoPi = 6.283185307179586f;

// triton's uint_to_uniform_float for 32 bits: bitcast to int32, fold negatives, scale
NOPROP_ALWAYS_INLINE float philox_uniform(uint32_t x) {
  const int32_t i = static_cast<int32_t>(x);
  return static_cast<float>(i < 0 ? ~i : i) * kIntToUniform;
}

// cos theta for theta in [0, 2 pi], evaluated in fp64 and rounded once: theta = k pi/2 + r with
// k = round(2 theta / pi) in 0..4 (rounded in fp32: any nearby k keeps |r| <= pi/4 + 1e-6), Taylor
// polynomials of cos r and sin r (truncation below 1e-11), and the quadrant k mod 4 picks cos r,
// -sin r, -cos r or sin r, by arithmetic: GCC does not vectorise a select between fp64 values on an
// int32 condition.
NOPROP_ALWAYS_INLINE float cos_angle(float theta) {
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k_float = (theta * 0.636619772f + round_magic) - round_magic;
  const int32_t quadrant = static_cast<int32_t>(k_float) & 3;
  const double k = k_float;
  // pi/2 in two parts: k times the first is exact
  const double r = (theta - k * 1.5707963267948966) - k * 6.123233995736766e-17;
  const double r2 = r * r;
  const double cos_r =
      1.0 + r2 * (-1.0 / 2 + r2 * (1.0 / 24 + r2 * (-1.0 / 720 + r2 * (1.0 / 40320 +
      r2 * (-1.0 / 3628800 + r2 * (1.0 / 479001600))))));
  const double sin_r =
      r * (1.0 + r2 * (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 +
      r2 * (-1.0 / 39916800))))));
  const double odd = static_cast<double>(quadrant & 1);                 // quadrants 1, 3: sin r
  const double sign = 1.0 - 2.0 * static_cast<double>(((quadrant + 1) >> 1) & 1);  // 1, 2: minus
  return static_cast<float>(sign * (odd * sin_r + (1.0 - odd) * cos_r));
}

// out[i] = randn(seed, first + i) for i < kPhiloxStrip (the counter wraps mod 2^64).
NOPROP_ALWAYS_INLINE void philox_randn_strip(uint64_t seed, uint64_t first, float* out) {
  uint32_t c0[kPhiloxStrip], c1[kPhiloxStrip], c2[kPhiloxStrip], c3[kPhiloxStrip];
  for (int64_t i = 0; i < kPhiloxStrip; ++i) {
    const uint64_t counter = first + static_cast<uint64_t>(i);
    c0[i] = static_cast<uint32_t>(counter);
    c1[i] = static_cast<uint32_t>(counter >> 32);
    c2[i] = 0;
    c3[i] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    for (int64_t i = 0; i < kPhiloxStrip; ++i) {  // hi and lo of the 32 x 32 -> 64-bit products
      const uint64_t product_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[i];
      const uint64_t product_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[i];
      const uint32_t next0 = static_cast<uint32_t>(product_b >> 32) ^ c1[i] ^ k0;
      const uint32_t next2 = static_cast<uint32_t>(product_a >> 32) ^ c3[i] ^ k1;
      c0[i] = next0;
      c1[i] = static_cast<uint32_t>(product_b);
      c2[i] = next2;
      c3[i] = static_cast<uint32_t>(product_a);
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
#pragma omp simd
  for (int64_t i = 0; i < kPhiloxStrip; ++i) {
    const float u1 = std::max(1e-7f, philox_uniform(c0[i]));
    const float theta = kTwoPi * philox_uniform(c1[i]);
    out[i] = std::sqrt(-2.0f * log_positive(u1)) * cos_angle(theta);
  }
}

}  // namespace noprop
