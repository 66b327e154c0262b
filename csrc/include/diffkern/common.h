// Torch-free helpers shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) code: dtype codes,
// element conversions to and from fp32, and the host/device qualifier macro.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#define DK_RESTRICT __restrict__
#else
#define DK_HD inline __attribute__((always_inline))
#define DK_RESTRICT __restrict__
#endif

namespace diffkern {

// Element types crossing the torch-free boundary (launchers take a code, not a ScalarType).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// 16-bit storage types: plain integers, so this header needs neither c10 nor cuda_fp16.h.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

DK_HD float bits_to_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

DK_HD uint32_t float_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

DK_HD float to_float(float x) { return x; }
DK_HD float to_float(double x) { return static_cast<float>(x); }
DK_HD float to_float(bf16_t x) { return bits_to_float(static_cast<uint32_t>(x.bits) << 16); }

DK_HD float to_float(f16_t x) {
#if defined(__CUDA_ARCH__)
  // Device: one exact cvt (same value as the host path below; NaN payloads may differ).
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
  return f;
#else
  // IEEE binary16 -> binary32, exact (subnormals scaled through a float multiply).
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    return bits_to_float(float_to_bits(magnitude) | sign);
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
#endif
}

template <typename T> DK_HD T from_float(float x);

template <> DK_HD float from_float<float>(float x) { return x; }
template <> DK_HD double from_float<double>(float x) { return static_cast<double>(x); }

template <> DK_HD bf16_t from_float<bf16_t>(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  // Device (sm_80+): cvt.rn (round to nearest even, NaN to NaN), as torch's CUDA float -> bfloat16;
  // same value as the host path below.
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return bf16_t{h};
#else
  // Round to nearest even, NaN stays a (quiet) NaN: matches torch's float -> bfloat16.
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>(0x7fc0u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
#endif
}

template <> DK_HD f16_t from_float<f16_t>(float x) {
#if defined(__CUDA_ARCH__)
  // Device: cvt.rn (round to nearest even, overflow to inf, subnormals kept, NaN to NaN), the
  // instruction torch's CUDA float -> half uses; same value as the host path below.
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
  return f16_t{h};
#else
  // Round to nearest even, overflow to inf, NaN to NaN: matches torch's float -> half.
  const uint32_t u = float_to_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u))};
  if (a >= 0x477ff000u) return f16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below 2^-14: a half subnormal (or zero); scale by 2^24 and round
    const float scaled = bits_to_float(a) * 16777216.0f;  // exact: a power-of-two scale
    const uint32_t r = static_cast<uint32_t>(scaled);
    const float frac = scaled - static_cast<float>(r);
    const uint32_t rounded = r + ((frac > 0.5f || (frac == 0.5f && (r & 1u))) ? 1u : 0u);
    return f16_t{static_cast<uint16_t>(sign | rounded)};
  }
  a += 0xc8000fffu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round half to even
  return f16_t{static_cast<uint16_t>(sign | (a >> 13))};
#endif
}

}  // namespace diffkern
