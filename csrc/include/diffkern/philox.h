// The counter-based random stream every diffkern operator draws from, torch-free (host and
// device). Same definitions, same bits as pyglue/ops/philox.py (the spec) and kernels/philox.py:
//
//   key     = the 64-bit seed
//   counter = (column, row, offset_lo32, offset_hi28 | tag << 28)   (tag < 16: the purpose)
//   uniform = (2 m + 1) 2^-53 with m = (x1 >> 12) << 32 | x0        exact in float64, in (0, 1)
//   normal  = sqrt(-2 ln u(x0, x1)) cos(2 pi u(x2, x3))              Box-Muller, one per counter
//
// Uniforms are bit-identical everywhere; normals agree to the last bits of the libm in use
// (log and cos are not correctly rounded on every platform).
#pragma once

#include <cmath>
#include <cstdint>

#include "diffkern/common.h"

namespace diffkern {
namespace philox {

struct Words {
  uint32_t x0, x1, x2, x3;
};

DK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox-4x32-10 (Salmon et al. 2011; the Random123 / Triton tl.philox round structure).
DK_HD Words philox4x32_10(uint64_t key, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
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

// The four words at (seed, offset, tag, row, col).
DK_HD Words words(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row, uint32_t col) {
  return philox4x32_10(seed, col, row, static_cast<uint32_t>(offset),
                       (static_cast<uint32_t>(offset >> 32) & 0x0FFFFFFFu) | (tag << 28));
}

// (2 m + 1) 2^-53 with m the 52 bits (hi >> 12) << 32 | lo: exact in float64, never 0 or 1.
DK_HD double to_unit(uint32_t lo, uint32_t hi) {
  const uint64_t m = (static_cast<uint64_t>(hi >> 12) << 32) | lo;
  return static_cast<double>(2 * m + 1) * 0x1p-53;
}

DK_HD double uniform(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row, uint32_t col) {
  const Words w = words(seed, offset, tag, row, col);
  return to_unit(w.x0, w.x1);
}

DK_HD double normal(uint64_t seed, uint64_t offset, uint32_t tag, uint32_t row, uint32_t col) {
  const Words w = words(seed, offset, tag, row, col);
  const double u_a = to_unit(w.x0, w.x1), u_b = to_unit(w.x2, w.x3);
  return std::sqrt(-2.0 * std::log(u_a)) * std::cos(6.283185307179586 * u_b);  // 2 pi, as Python's 2.0 * math.pi
}

}  // namespace philox
}  // namespace diffkern
