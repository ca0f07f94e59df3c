// What every CPU fused op shares: the dtype dispatch, the grain below which a loop stays on one
// thread, fp32 loads and stores of fp32/fp16/bf16 values, multi-versioned hot loops (and, from
// vec_math.h, an exp and a log that vectorise).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "vec_math.h"

namespace noprop {

// fp32, fp16 and bf16: the dtypes the ops take (the Python front end rejects the rest).
#define NOPROP_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)   \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// The hot loops are compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2, FMA, F16C) and
// baseline x86-64, and the loader picks one by the CPU's features when the library is opened (GCC
// function multi-versioning, GCC >= 12). The build flags stay portable (no -march=native), so a
// build cache shared between machines stays correct.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define NOPROP_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NOPROP_VECTOR_CLONES
#endif

// Elements of simple elementwise work below which a loop runs on the calling thread: waking the
// OpenMP team costs a few microseconds, as much as ~30k fused multiply-adds.
constexpr int64_t kGrainElements = 32768;

// Iterations of a loop over `items` of `work` elements each that give one task kGrainElements.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, work_per_item));
}

template <typename scalar_t>
inline float to_float(scalar_t x) { return static_cast<float>(x); }

// fp32 -> fp16/bf16 with round-to-nearest-even, as torch's .to(dtype)
template <typename scalar_t>
inline scalar_t from_float(float x) { return static_cast<scalar_t>(x); }

}  // namespace noprop
