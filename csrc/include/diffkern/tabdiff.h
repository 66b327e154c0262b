// TabDiff's per-step sampler math outside the network, torch-free (host and device): one
// function per cell, so a backend is a loop over cells plus its memory layout. The spec is the
// float64 reference in pyglue/ops/tabdiff.py; everything here computes in double, in the same
// order, so numerical results agree to float tolerance and categorical draws are equal unless
// two race keys of one cell lie within rounding (~1e-16 relative) of each other.
//
// Random numbers come from the shared Philox stream (philox.h) keyed by
// (seed, offset = step, tag, global row, column) with the family's tags (pyglue/ops/philox.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "diffkern/common.h"
#include "diffkern/philox.h"

namespace diffkern {
namespace tabdiff {

constexpr uint32_t kTagChurn = 4, kTagRemask = 5, kTagUnmask = 6, kTagObserved = 7;
constexpr double kRaceEps = 1e-10;  // the official sampler's guard in -log(u + eps) + eps

// Status slots (counts of bad cells): the Python finish re-runs the reference checks to raise.
// kBadLogit: NaN or +inf in a logit segment, or a masked cell whose K class logits are all -inf.
enum Status : int { kBadCategory = 0, kNonFiniteDenoised = 1, kBadLogit = 2, kStatusSlots = 3 };

// Element value in double: exact for every storage type (common.h's to_float narrows double).
DK_HD double as_double(double x) { return x; }
template <typename T>
DK_HD double as_double(T x) { return static_cast<double>(to_float(x)); }

// Churn of one numerical cell: x + sqrt(max(s_hat^2 - s^2, 0)) eps.
// Equal levels give exactly x, as in the reference, even where the compiler contracts the
// difference of squares into an FMA (-march=native builds, CUDA): that one is not exactly 0.
DK_HD double churn_value(double x, double sigma_cur, double sigma_hat, double eps) {
  if (sigma_hat == sigma_cur) return x;
  const double var = sigma_hat * sigma_hat - sigma_cur * sigma_cur;
  return x + (var > 0.0 ? std::sqrt(var) : 0.0) * eps;
}

// EDM Euler update of one cell; d (the slope) is kept for Heun.
DK_HD double euler_value(double x_hat, double denoised, double sigma_hat, double sigma_next, double& d) {
  d = (x_hat - denoised) / sigma_hat;
  return x_hat + (sigma_next - sigma_hat) * d;
}

// Heun's correction: x_hat + (s_next - s_hat) (d / 2 + d' / 2), d' = (x_next - D') / s_next.
DK_HD double heun_value(double x_hat, double x_next, double denoised_next, double d, double sigma_hat,
                        double sigma_next) {
  const double d_prime = (x_next - denoised_next) / sigma_next;
  return x_hat + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_prime);
}

// The unmask draw of one masked cell from its logit segment seg[0 .. K] (seg[K] is the MASK
// logit, ignored: SUBS). q_k = softmax_k * (alpha_s - alpha_t) for k < K, q_K = 1 - alpha_s;
// the exponential race argmax_k q_k / (eps - log(u_k + eps)), first maximum on ties.
// uniform(k) returns slot k's uniform in (0, 1). This is the per-cell statement of the race; the
// CPU backend runs the same steps vectorised over a row (csrc/cpu/tabdiff.cpp: race_row), Triton
// over a tile of cells (kernels/tabdiff.py). Returns -1 for a bad segment (NaN or +inf anywhere,
// or every class logit -inf): the caller counts it in kBadLogit.
template <typename Logit, typename UniformOfSlot>
DK_HD int64_t unmask_draw(const Logit* seg, int64_t K, double alpha_t, double alpha_s, UniformOfSlot uniform) {
  double max_logit = -INFINITY;
  bool bad = false;
  for (int64_t k = 0; k <= K; ++k) {  // the MASK logit is checked, never used
    const double v = as_double(seg[k]);
    bad |= std::isnan(v) || v == INFINITY;
    if (k < K) max_logit = fmax(max_logit, v);
  }
  if (bad || max_logit == -INFINITY) return -1;
  double sum = 0.0;
  for (int64_t k = 0; k < K; ++k) sum += std::exp(as_double(seg[k]) - max_logit);
  const double log_sum = std::log(sum), gap = alpha_s - alpha_t;
  int64_t best = K;
  double best_key = (1.0 - alpha_s) / (kRaceEps - std::log(uniform(K) + kRaceEps));
  for (int64_t k = 0; k < K; ++k) {
    const double q = std::exp((as_double(seg[k]) - max_logit) - log_sum) * gap;
    const double key = q / (kRaceEps - std::log(uniform(k) + kRaceEps));
    if (key > best_key || (key == best_key && k < best)) {
      best_key = key;
      best = k;
    }
  }
  return best;
}

}  // namespace tabdiff
}  // namespace diffkern
