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

// ---- bf16 pairs: 32 bf16 as two v16f without any cross-lane shuffle ----------------------
// A 32-bit lane of 32 packed bf16 holds elements (2i, 2i+1): the low half shifted up is
// float(x[2i]), the high half masked is float(x[2i+1]). Converting 16 bf16 to 16 contiguous
// floats instead takes a widening shuffle per 8 elements (vpmovzxwd and lane inserts, the
// shuffle port's work), which made one core's bf16 combination compute-bound.

// even[i] = float(p[2i]), odd[i] = float(p[2i + 1]), i < 16.
DK_HD void load32_pairs(const bf16_t* p, v16f& even, v16f& odd) {
  v16u w;
  __builtin_memcpy(&w, p, sizeof(w));  // unaligned: rows may start at any element
  even = (v16f)(w << 16);
  odd = (v16f)(w & 0xffff0000u);
}

// Round to nearest even; NaN -> quiet NaN (same rule as from_float<bf16_t>).
DK_HD v16h to_bf16_bits(v16f v) {
  const v16u u = (v16u)v;  // vector casts are bitcasts
  const v16u rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const v16i is_nan = (v16i)(u & 0x7fffffffu) > 0x7f800000;
  return __builtin_convertvector(is_nan ? v16u{} + 0x7fc0u : rounded, v16h);
}

DK_HD void store16(bf16_t* p, v16f v) { *reinterpret_cast<v16h*>(p) = to_bf16_bits(v); }

// Round to nearest even into the bf16 bits of each 32-bit lane (low 16 bits of the result hold
// nothing useful for `odd`, the high 16 nothing for `even`): the pair word is rounded(even) >> 16
// | rounded(odd) & 0xffff0000, the layout load32_pairs reads.
DK_HD v16u bf16_round_bits(v16f v) {
  const v16u u = (v16u)v;
  const v16u rounded = u + 0x7fffu + ((u >> 16) & 1u);
  const v16i is_nan = (v16i)(u & 0x7fffffffu) > 0x7f800000;
  return is_nan ? v16u{} + 0x7fc00000u : rounded;
}

DK_HD v16u bf16_pair_words(v16f even, v16f odd) {
  return (bf16_round_bits(even) >> 16) | (bf16_round_bits(odd) & 0xffff0000u);
}

// p[2i] = even[i], p[2i + 1] = odd[i] for 32 outputs of any type.
DK_HD void store32_pairs(bf16_t* p, v16f even, v16f odd) {
  const v16u w = bf16_pair_words(even, odd);
  __builtin_memcpy(p, &w, sizeof(w));
}

DK_HD void store32_pairs(float* p, v16f even, v16f odd) {
  const v16i lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const v16i hi = lo + 8;
  store16(p, __builtin_shuffle(even, odd, lo));
  store16(p + 16, __builtin_shuffle(even, odd, hi));
}

template <typename T>
DK_HD void store32_pairs(T* p, v16f even, v16f odd) {
  for (int i = 0; i < 16; ++i) {
    p[2 * i] = from_float<T>(even[i]);
    p[2 * i + 1] = from_float<T>(odd[i]);
  }
}

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

DK_TARGET_AVX512 inline void stream32_pairs(bf16_t* p, v16f even, v16f odd) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(p), (__m512i)bf16_pair_words(even, odd));
}

DK_TARGET_AVX512 inline void stream32_pairs(float* p, v16f even, v16f odd) {
  const v16i lo = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
  const v16i hi = lo + 8;
  stream16(p, __builtin_shuffle(even, odd, lo));
  stream16(p + 16, __builtin_shuffle(even, odd, hi));
}

template <typename T> DK_TARGET_AVX512 inline void stream32_pairs(T* p, v16f even, v16f odd) {
  store32_pairs(p, even, odd);
}

DK_TARGET_AVX512 inline void stream_fence() { _mm_sfence(); }
#else
template <typename T> inline constexpr bool kCanStream = false;
template <typename T> inline void stream16(T* p, v16f v) { store16(p, v); }
template <typename T> inline void stream32_pairs(T* p, v16f even, v16f odd) { store32_pairs(p, even, odd); }
inline void stream_fence() {}
#endif

}  // namespace cpu
}  // namespace diffkern
