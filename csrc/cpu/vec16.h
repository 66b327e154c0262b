// 16-lane float vectors through GCC vector extensions: one source compiles to zmm in the
// AVX-512 clone, 2 x ymm in the AVX2 clone and 4 x xmm in the baseline (see simd_dispatch.h).
// Explicit vector values keep accumulators in registers, which auto-vectorised array loops
// did not (they round-tripped through memory on every input row).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "diffkern/common.h"
#include "simd_dispatch.h"

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

// Round to nearest even; NaN -> quiet NaN (same rule as from_float<bf16_t>).
DK_HD v16h to_bf16_bits(v16f v) {
  const v16u u = (v16u)v;  // vector casts are bitcasts
  const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v16i is_nan = (v16i)(u & 0x7fffffffu) > 0x7f800000;
  return __builtin_convertvector(is_nan ? v16u{} + 0x7fc0u : rounded, v16h);
}

DK_HD void store16(bf16_t* p, v16f v) { *reinterpret_cast<v16h*>(p) = to_bf16_bits(v); }

template <typename T>
DK_HD void store16(T* p, v16f v) {
  for (int i = 0; i < 16; ++i) p[i] = from_float<T>(v[i]);
}

// Non-temporal (cache-bypassing) stores of 16 lanes to a 64-byte (fp32) / 32-byte (bf16)
// aligned address. Only for AVX-512 code: call them from DK_TARGET_AVX512 functions only.
#if defined(__x86_64__) && defined(__GNUC__)
template <typename T> inline constexpr bool kCanStream = std::is_same_v<T, float> || std::is_same_v<T, bf16_t>;

DK_TARGET_AVX512 inline void stream16(float* p, v16f v) { _mm512_stream_ps(p, (__m512)v); }

DK_TARGET_AVX512 inline void stream16(bf16_t* p, v16f v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)to_bf16_bits(v));
}

template <typename T> DK_TARGET_AVX512 inline void stream16(T* p, v16f v) { store16(p, v); }

DK_TARGET_AVX512 inline void stream_fence() { _mm_sfence(); }
#else
template <typename T> inline constexpr bool kCanStream = false;
template <typename T> inline void stream16(T* p, v16f v) { store16(p, v); }
inline void stream_fence() {}
#endif

}  // namespace cpu
}  // namespace diffkern
