// 16-lane float vectors through GCC vector extensions: one source compiles to zmm in the
// AVX-512 clone, 2 x ymm in the AVX2 clone and 4 x xmm in the baseline (see simd_dispatch.h).
// Explicit vector values keep accumulators in registers, which auto-vectorised array loops
// did not (they round-tripped through memory on every input row).
#pragma once

#include <cstdint>

#include "diffkern/common.h"

namespace diffkern {
namespace cpu {

typedef float v16f __attribute__((vector_size(64), aligned(4)));       // unaligned loads allowed
typedef uint32_t v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));
typedef uint16_t v16h __attribute__((vector_size(32), aligned(2)));

DK_HD v16f load16(const float* p) { return *reinterpret_cast<const v16f*>(p); }

DK_HD v16f load16(const bf16_t* p) {
  return (v16f)(__builtin_convertvector(*reinterpret_cast<const v16h*>(p), v16u) << 16);
}

template <typename T>
DK_HD v16f load16(const T* p) {  // half, double: element-wise (not a performance target)
  v16f v;
  for (int i = 0; i < 16; ++i) v[i] = to_float(p[i]);
  return v;
}

DK_HD void store16(float* p, v16f v) { *reinterpret_cast<v16f*>(p) = v; }

DK_HD void store16(bf16_t* p, v16f v) {
  // Round to nearest even; NaN -> quiet NaN (same rule as from_float<bf16_t>).
  const v16u u = (v16u)v;
  const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v16i is_nan = (v16i)(u & 0x7fffffffu) > 0x7f800000;  // vector casts are bitcasts
  const v16u bits = is_nan ? v16u{} + 0x7fc0u : rounded;
  *reinterpret_cast<v16h*>(p) = __builtin_convertvector(bits, v16h);
}

template <typename T>
DK_HD void store16(T* p, v16f v) {
  for (int i = 0; i < 16; ++i) p[i] = from_float<T>(v[i]);
}

}  // namespace cpu
}  // namespace diffkern
