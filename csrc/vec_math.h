// exp and log in plain arithmetic that the compiler vectorises (libm's expf and logf are scalar
// calls), for the softmax and the Box-Muller transform. No ATen here: philox.h includes it too.
// Vectorising their selects needs -fno-trapping-math (cpu_ops.CFLAGS): otherwise GCC keeps a
// compare that "could trap" as a branch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace noprop {

// Inlined into each vectorised clone of a caller (NOPROP_VECTOR_CLONES in common.h): a call out
// would run code compiled for baseline x86-64, one element at a time.
#define NOPROP_ALWAYS_INLINE inline __attribute__((always_inline))

// e^x for x <= 88, within ~2 ulp, in plain float arithmetic that the compiler vectorises (the
// softmax's exps; glibc's expf is scalar). x = n ln2 + r with n = round(x / ln2), |r| <= ln2 / 2;
// e^r by its degree-7 Taylor polynomial (truncation below 1e-8 relative); 2^n built in the exponent
// bits. ln2 is split in two (Cody-Waite) so that n ln2_hi is exact. x < -87 (and -inf) gives 0:
// 2^n would be subnormal there, and such terms are below fp32 resolution next to a softmax's max.
NOPROP_ALWAYS_INLINE float exp_fast(float x) {
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f, log2e = 1.44269504088896341f;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float low = x < -87.0f ? -87.0f : x;  // selects of values, not std::min / max of
  const float clamped = low > 88.0f ? 88.0f : low;  // references (GCC keeps those as branches)
  const float n = (clamped * log2e + round_magic) - round_magic;
  const float r = (clamped - n * ln2_hi) - n * ln2_lo;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

// log x for a positive normal fp32 x, evaluated in fp64 and rounded once (so within an ulp, and
// correctly rounded but for rare halfway cases). x = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = (m - 1) / (m + 1), |s| <= 0.172: seven
// terms leave a relative error below 1e-11. The reduction is integer arithmetic on the bits, and
// fp64 enters through int32 / fp32 conversions: the forms that vectorise without AVX-512.
NOPROP_ALWAYS_INLINE float log_positive(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t mantissa_bits = (bits & 0x007FFFFFu) | 0x3F800000u;  // the mantissa, in [1, 2)
  const uint32_t above = (0x3FB504F3u - mantissa_bits) >> 31;        // 1 above sqrt(2): halve it
  const uint32_t reduced_bits = mantissa_bits - (above << 23);        // exponent field - 1: exact
  const int32_t exponent = static_cast<int32_t>((bits >> 23) + above) - 127;
  float m_reduced;
  std::memcpy(&m_reduced, &reduced_bits, sizeof(m_reduced));
  const double m = m_reduced, s = (m - 1.0) / (m + 1.0), z = s * s;
  const double series =
      1.0 + z * (1.0 / 3 + z * (1.0 / 5 + z * (1.0 / 7 + z * (1.0 / 9 + z * (1.0 / 11 + z / 13)))));
  return static_cast<float>(static_cast<double>(exponent) * 0.6931471805599453 + 2.0 * s * series);
}

}  // namespace noprop
