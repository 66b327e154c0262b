// Torch-free math of the PoE operator family (diffkern.ops.poe), shared by the CPU kernels
// (csrc/cpu/poe.cpp) and any CUDA kernel: Philox-4x32-10 counter RNG -> float64 uniform,
// a vectorisable polynomial exp, online max / log-sum-exp merging, a monotone float key for
// radix selection, bf16 -> fp32, and the log-space acceptance test.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DK_HD __host__ __device__ __forceinline__
#else
#define DK_HD inline __attribute__((always_inline))
#endif

namespace diffkern {
namespace poe {

// Purpose tags of the random streams (disjoint draft / acceptance / residual noise).
constexpr uint32_t kTagDraft = 1, kTagAccept = 2, kTagResidual = 3;

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

DK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32-10 (Salmon et al. 2011; the Random123 / Triton tl.philox round structure).
DK_HD Philox4 philox4x32_10(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
  return {c0, c1, c2, c3};
}

// The stream of diffkern.ops.poe: key = seed, counter = (col, row, offset_lo, offset_hi28 | tag<<28);
// u = (2m + 1) 2^-53 with m = (x1 >> 12) << 32 | x0: exact in float64, in (0, 1).
DK_HD double philox_uniform(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row, uint32_t col) {
  const Philox4 r = philox4x32_10(seed, col, row, static_cast<uint32_t>(offset),
                                  (static_cast<uint32_t>(offset >> 32) & 0x0FFFFFFFu) | (tag << 28));
  const uint64_t m = (static_cast<uint64_t>(r.x1 >> 12) << 32) | r.x0;
  return static_cast<double>(2 * m + 1) * 0x1p-53;
}

DK_HD float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

DK_HD uint32_t float_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

DK_HD float bf16_bits_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// exp(x) for x <= 0 (Cephes expf polynomial, ~2 ulp), written branch-free so loops over it
// auto-vectorise; exactly 0 for x < -87.3 (so -inf logits give exactly zero probability).
DK_HD float fast_exp(float x) {
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f + 12582912.0f;  // round(x / ln 2) via the 1.5*2^23 trick
  const float n = t - 12582912.0f;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t)) - 0x4B400000;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < -87.3f ? 0.0f : y * scale;
}

// Monotone unsigned key of a float: a < b  <=>  key(a) < key(b), and a == b  <=>  key(a) ==
// key(b) (no NaN). -0.0 is keyed as +0.0 (f + 0.0f), so equal logits of either sign tie and the
// nucleus breaks the tie toward the lower token id, as the reference does.
DK_HD uint32_t float_key(float f) {
  const uint32_t b = float_to_bits(f + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Online (max, sum exp(x - max)) state of a softmax denominator.
struct MaxSum {
  float m = -INFINITY;
  float s = 0.0f;
};

// Merge a chunk's (m, s) into the running state; -inf chunks are no-ops.
DK_HD void merge(MaxSum& a, float m, float s) {
  if (m == -INFINITY) return;
  if (m > a.m) {
    a.s = a.s * std::exp(a.m - m) + s;  // a.m = -inf gives 0 * ... = 0
    a.m = m;
  } else {
    a.s += s * std::exp(m - a.m);
  }
}

DK_HD float log_sum_exp(const MaxSum& a) { return a.m + std::log(a.s); }

// Speculative-sampling test in log space: accept x iff q(x) > 0 and u < p(x) / q(x).
DK_HD bool accept_log(double u, double log_p, double log_q) {
  if (!(log_q > -INFINITY)) return false;
  return std::log(u) < log_p - log_q;
}

}  // namespace poe
}  // namespace diffkern
