// Torch-free math of the PoE operator family (diffkern.ops.poe), shared by the CPU kernels
// (csrc/cpu/poe.cpp) and any CUDA kernel: a vectorisable polynomial exp, online max /
// log-sum-exp merging, a monotone float key for radix selection, the log-space acceptance test
// and the status counters the kernels return. The random stream is diffkern/philox.h, the
// element conversions diffkern/common.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "diffkern/common.h"
#include "diffkern/philox.h"

namespace diffkern {
namespace poe {

// Status counters a fast kernel returns instead of raising (pyglue/ops/poe.py raises from them,
// once, for every fast backend): per logits tensor, in this order, then poe_verify's rows whose
// PoE logits are entirely -inf.
enum LogitStatus : int { kNanCount = 0, kPosInfCount = 1, kEmptyRows = 2, kStatusPerLogits = 3 };

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
