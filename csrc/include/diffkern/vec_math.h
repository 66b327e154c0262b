// Branch-free float64 exp and log and a Philox uniform run, for CPU loops under `#pragma omp simd`.
//
// libm's exp/log are calls, which stop a loop from vectorising; these are fdlibm's algorithms
// (|error| < 1 ulp, checked against libm in tests/test_tabdiff_backends.py through the kernels)
// written with selects instead of branches, so GCC vectorises them (it needs -fno-trapping-math
// to if-convert the selects). The Philox run computes the same bits as philox::uniform: the
// uint64 -> double conversion is done with the exponent trick (AVX2 has no such instruction).
// Host-only: the CUDA/Triton kernels use their own libdevice functions.
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>

#include "diffkern/common.h"

#define DK_VEC inline __attribute__((always_inline))

namespace diffkern {
namespace vec {

// log(x) for finite x > 0 in the normal range (fdlibm e_log.c's polynomial, no special cases).
DK_VEC double log_positive(double x) {
  const uint64_t bits = std::bit_cast<uint64_t>(x);
  double m = std::bit_cast<double>((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  double k = std::bit_cast<double>((bits >> 52) | 0x4330000000000000ull) - (0x1p52 + 1023.0);  // exponent
  const bool high = m > 1.4142135623730951;                                                   // to [0.707, 1.414)
  m = high ? 0.5 * m : m;
  k = high ? k + 1.0 : k;
  const double f = m - 1.0, hfsq = 0.5 * f * f, s = f / (2.0 + f), z = s * s, w = z * z;
  const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double t2 = z * (6.666666666666735130e-01 +
                         w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  return k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + t2 + t1) + k * 1.90821492927058770002e-10)) - f);
}

// 2^k for an integer-valued k in [-1022, 1023].
DK_VEC double exp2_int(double k) {
  return std::bit_cast<double>(std::bit_cast<uint64_t>(k + (1023.0 + 0x1p52)) << 52);
}

// exp(x) for x <= 0 (what a softmax needs): -inf and x below -745.2 give 0, subnormals are kept
// (fdlibm e_exp.c's reduction and polynomial; round-to-nearest k by the 1.5 * 2^52 trick).
DK_VEC double exp_nonpositive(double x) {
  const bool zero = !(x >= -745.2);
  x = zero ? 0.0 : x;
  const double k = (x * 1.44269504088896338700 + 0x1.8p52) - 0x1.8p52;
  const double hi = x - k * 6.93147180369123816490e-01, lo = k * 1.90821492927058770002e-10;
  const double r = hi - lo, r2 = r * r;
  const double c = r - r2 * (1.66666666666666019037e-01 +
                             r2 * (-2.77777777770155933842e-03 +
                                   r2 * (6.61375632143793436117e-05 +
                                         r2 * (-1.65339022054652515390e-06 + r2 * 4.13813679705723846039e-08))));
  const double y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi);
  const double k_normal = k > -1022.0 ? k : -1022.0;           // two scalings reach the subnormals
  const double v = y * exp2_int(k_normal) * exp2_int(k - k_normal);
  return zero ? 0.0 : v;
}

// cos(t) for t in [0, 2 pi] (the Box-Muller angle): Cody-Waite reduction by pi / 2 and FreeBSD's
// k_cos.c / k_sin.c polynomials on |r| <= pi / 4, the quadrant picked by selects.
DK_VEC double cos_0_2pi(double t) {
  const double k = (t * 6.36619772367581382433e-01 + 0x1.8p52) - 0x1.8p52;  // nearest quadrant, 0..4
  const double r = (t - k * 1.57079632673412561417e+00) - k * 6.07710050650619224932e-11;
  const double z = r * r, w = z * z;
  const double cr = z * (4.16666666666666019037e-02 + z * (-1.38888888888741095749e-03 + z * 2.48015872894767294178e-05)) +
                    w * w * (-2.75573143513906633035e-07 + z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11));
  const double hz = 0.5 * z, one_minus_hz = 1.0 - hz;
  const double cos_r = one_minus_hz + (((1.0 - one_minus_hz) - hz) + z * cr);
  const double sr = 8.33333333332248946124e-03 + z * (-1.98412698298579493134e-04 + z * 2.75573137070700676789e-06) +
                    z * w * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10);
  const double sin_r = r + z * r * (-1.66666666666666324348e-01 + z * sr);
  const double q = k == 4.0 ? 0.0 : k;  // the quadrant: cos, -sin, -cos, sin
  const double even = q == 0.0 ? cos_r : -cos_r;
  const double odd = q == 1.0 ? -sin_r : sin_r;
  return (q == 0.0 || q == 2.0) ? even : odd;
}

// philox::to_unit without a uint64 -> double conversion (AVX2 has none): (2 m + 1) 2^-53 exactly.
DK_VEC double to_unit(uint32_t lo, uint32_t hi) {
  const uint64_t m = (static_cast<uint64_t>(hi >> 12) << 32) | lo;
  return (std::bit_cast<double>(m | 0x3FF0000000000000ull) - 1.0) + 0x1p-53;
}

// philox::philox4x32_10 on the counter (col, row, offset_lo, offset_hi | tag << 28), in place.
DK_VEC void philox_rounds(uint64_t seed, uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3) {
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * c0, p1 = uint64_t{0xCD9E8D57u} * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0, n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c0 = n0; c1 = static_cast<uint32_t>(p1); c2 = n2; c3 = static_cast<uint32_t>(p0);
    k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
  }
}

// The counter's last two words: (offset_lo, offset_hi | tag << 28), as philox::words.
DK_VEC void counter_tail(uint64_t offset, uint32_t tag, uint32_t& c2, uint32_t& c3) {
  c2 = static_cast<uint32_t>(offset);
  c3 = (static_cast<uint32_t>(offset >> 32) & 0x0FFFFFFFu) | (tag << 28);
}

// out[i] = philox::uniform(seed, offset, tag, row, col0 + i) for i < n, the same bits.
DK_VEC void philox_uniforms(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row, uint32_t col0, int64_t n,
                            double* DK_RESTRICT out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = col0 + static_cast<uint32_t>(i), c1 = row, c2, c3;
    counter_tail(offset, tag, c2, c3);
    philox_rounds(seed, c0, c1, c2, c3);
    out[i] = to_unit(c0, c1);
  }
}

// out[i] = philox::normal(seed, offset, tag, row0 + i, col) for i < n: one column down n rows
// (Box-Muller; equal to philox::normal to the last bits of libm's log and cos).
DK_VEC void philox_normals_down(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row0, uint32_t col, int64_t n,
                                double* DK_RESTRICT out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t c0 = col, c1 = row0 + static_cast<uint32_t>(i), c2, c3;
    counter_tail(offset, tag, c2, c3);
    philox_rounds(seed, c0, c1, c2, c3);
    const double radius = std::sqrt(-2.0 * log_positive(to_unit(c0, c1)));
    out[i] = radius * cos_0_2pi(6.283185307179586 * to_unit(c2, c3));
  }
}

}  // namespace vec
}  // namespace diffkern
