// Per-ISA clones without -march=native: a hot loop is written once as an always-inline
// template and instantiated inside wrappers compiled for AVX-512, AVX2 and the x86-64
// baseline; the best one this CPU supports is picked at run time.
#pragma once

#include <string>

namespace diffkern {
namespace cpu {

enum class Isa { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

inline Isa runtime_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

inline std::string isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace diffkern

#if defined(__x86_64__) && defined(__GNUC__)
#define DK_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define DK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define DK_HAVE_ISA_CLONES 1
#else
#define DK_TARGET_AVX512
#define DK_TARGET_AVX2
#define DK_HAVE_ISA_CLONES 0
#endif

#define DK_COMMA ,

// Define <name>_avx512/_avx2/_default wrappers around the always-inline template <name>_impl
// and a dispatcher <name>(...) that calls the best one. Usage:
//   DK_ISA_CLONES(template <typename T>, combine_tasks, (const Args<T>& a, int64_t b, int64_t e), <T>, (a, b, e))
// (write a comma inside TEMPLATE_HEAD or TARGS as DK_COMMA)
#define DK_ISA_CLONES(TEMPLATE_HEAD, NAME, PARAMS, TARGS, ARGS)                             \
  TEMPLATE_HEAD DK_TARGET_AVX512 void NAME##_avx512 PARAMS { NAME##_impl TARGS ARGS; }     \
  TEMPLATE_HEAD DK_TARGET_AVX2 void NAME##_avx2 PARAMS { NAME##_impl TARGS ARGS; }         \
  TEMPLATE_HEAD void NAME##_default PARAMS { NAME##_impl TARGS ARGS; }                     \
  TEMPLATE_HEAD void NAME PARAMS {                                                         \
    switch (::diffkern::cpu::runtime_isa()) {                                              \
      case ::diffkern::cpu::Isa::kAvx512: return NAME##_avx512 TARGS ARGS;                 \
      case ::diffkern::cpu::Isa::kAvx2: return NAME##_avx2 TARGS ARGS;                     \
      default: return NAME##_default TARGS ARGS;                                           \
    }                                                                                      \
  }
