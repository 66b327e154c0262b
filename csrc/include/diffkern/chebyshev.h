// Chebyshev ridge forecasting, torch-free: the math shared by csrc/cpu and csrc/cuda.
//
// Every Chebyshev operator is a *snapshot combination* out[s, q, :] = sum_k W[s, q, k] in[s, k, :]:
//   fit      W = (X^T X + lam D)^-1 X^T              [P, K]   (in = snapshots)
//   eval     W = basis(tau_q)                        [Q, P]   (in = coefficients)
//   forecast W = basis(tau_q) (X^T X + lam D)^-1 X^T [Q, K]   (+ Taylor terms on the last two rows)
// The weights are tiny and solved here on the host in fp64; the combination is the only pass
// over the features (bandwidth-bound) and accumulates in fp32 (combine_step below).
#pragma once

#include <cmath>
#include <vector>

#include "diffkern/common.h"

namespace diffkern {
namespace cheb {

constexpr int kMaxDegree = 30;

// ---- per-element math, host and device -----------------------------------------------------

// acc[q] += w[q * w_stride] * x for the q-block of one element: the inner step of every
// combination kernel (CPU loops and the CUDA kernel both call it).
template <int QB>
DK_HD void combine_step(float (&acc)[QB], const float* w, int w_stride, float x) {
#pragma unroll
  for (int q = 0; q < QB; ++q) acc[q] = fmaf(w[q * w_stride], x, acc[q]);
}

// ---- host-side fp64 weight solves ----------------------------------------------------------

inline double tau_of(double t, double t_min, double t_max) {
  return 2.0 * (t - t_min) / (t_max - t_min) - 1.0;
}

// T_0..T_degree at tau by the recurrence; out has degree + 1 entries.
inline void basis(double tau, int degree, double* out) {
  out[0] = 1.0;
  if (degree >= 1) out[1] = tau;
  for (int p = 2; p <= degree; ++p) out[p] = 2.0 * tau * out[p - 1] - out[p - 2];
}

// In-place Cholesky of the P x P row-major G into its lower factor; false if not positive
// definite (a pivot below 1e-16 of the largest diagonal entry). The Python op refuses
// systems with condition number > 1e14 first, on every backend alike; this is a safety net.
inline bool cholesky(double* G, int P) {
  double scale = 0.0;
  for (int i = 0; i < P; ++i) scale = std::fmax(scale, std::fabs(G[i * P + i]));
  for (int j = 0; j < P; ++j) {
    double d = G[j * P + j];
    for (int k = 0; k < j; ++k) d -= G[j * P + k] * G[j * P + k];
    if (!(d > 1e-16 * scale)) return false;
    d = std::sqrt(d);
    G[j * P + j] = d;
    for (int i = j + 1; i < P; ++i) {
      double v = G[i * P + j];
      for (int k = 0; k < j; ++k) v -= G[i * P + k] * G[j * P + k];
      G[i * P + j] = v / d;
    }
  }
  return true;
}

// Solve L L^T y = b in place (L from cholesky()).
inline void cholesky_solve(const double* L, int P, double* b) {
  for (int i = 0; i < P; ++i) {
    double v = b[i];
    for (int k = 0; k < i; ++k) v -= L[i * P + k] * b[k];
    b[i] = v / L[i * P + i];
  }
  for (int i = P - 1; i >= 0; --i) {
    double v = b[i];
    for (int k = i + 1; k < P; ++k) v -= L[k * P + i] * b[k];
    b[i] = v / L[i * P + i];
  }
}

struct RidgeProblem {
  int degree;
  double lam, t_min, t_max;
  bool penalize_intercept;
};

// A = (X^T X + lam D)^-1 X^T for one stream, row-major [P, K]. False if the system is singular.
inline bool ridge_operator(const double* times, int K, const RidgeProblem& pb, double* A) {
  const int P = pb.degree + 1;
  std::vector<double> X(static_cast<size_t>(K) * P), G(static_cast<size_t>(P) * P, 0.0);
  for (int k = 0; k < K; ++k) basis(tau_of(times[k], pb.t_min, pb.t_max), pb.degree, &X[k * P]);
  for (int i = 0; i < P; ++i)
    for (int j = 0; j < P; ++j)
      for (int k = 0; k < K; ++k) G[i * P + j] += X[k * P + i] * X[k * P + j];
  for (int i = 0; i < P; ++i)
    if (i > 0 || pb.penalize_intercept) G[i * P + i] += pb.lam;
  if (!cholesky(G.data(), P)) return false;
  std::vector<double> column(P);
  for (int k = 0; k < K; ++k) {
    for (int p = 0; p < P; ++p) column[p] = X[k * P + p];
    cholesky_solve(G.data(), P, column.data());
    for (int p = 0; p < P; ++p) A[p * K + k] = column[p];
  }
  return true;
}

// Forecast weights for one stream, row-major [Q, K]: blend * basis(tau_q) A plus
// (1 - blend) * the first-order Taylor step through the last two snapshots.
inline bool forecast_weights(const double* times, int K, const double* t_query, int Q,
                             const RidgeProblem& pb, double blend, double* W) {
  const int P = pb.degree + 1;
  std::vector<double> A(static_cast<size_t>(P) * K), b(P);
  if (!ridge_operator(times, K, pb, A.data())) return false;
  for (int q = 0; q < Q; ++q) {
    basis(tau_of(t_query[q], pb.t_min, pb.t_max), pb.degree, b.data());
    for (int k = 0; k < K; ++k) {
      double w = 0.0;
      for (int p = 0; p < P; ++p) w += b[p] * A[p * K + k];
      W[q * K + k] = blend * w;
    }
    if (blend != 1.0) {
      const double slope_steps = (t_query[q] - times[K - 1]) / (times[K - 1] - times[K - 2]);
      W[q * K + K - 1] += (1.0 - blend) * (1.0 + slope_steps);
      W[q * K + K - 2] += (1.0 - blend) * (-slope_steps);
    }
  }
  return true;
}

}  // namespace cheb
}  // namespace diffkern
