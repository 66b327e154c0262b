// The one TORCH_LIBRARY block of the diffkern namespace (operator families add theirs with
// TORCH_LIBRARY_FRAGMENT), plus build_info(): what this extension was compiled with.

#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

#include "simd_dispatch.h"

namespace diffkern {
namespace {

#define DK_STR2(x) #x
#define DK_STR(x) DK_STR2(x)

std::string build_info() {
  std::string info = "torch=" DK_STR(TORCH_VERSION_MAJOR) "." DK_STR(TORCH_VERSION_MINOR) "." DK_STR(TORCH_VERSION_PATCH);
#if defined(__VERSION__)
  info += std::string(";compiler=") + __VERSION__;
#endif
#if defined(_OPENMP)
  info += ";openmp=1";
#else
  info += ";openmp=0";
#endif
#if defined(DIFFKERN_WITH_CUDA)
  info += ";cuda=1";
#else
  info += ";cuda=0";
#endif
  info += ";isa_clones=" DK_STR(DK_HAVE_ISA_CLONES);
  info += ";runtime_isa=" + cpu::isa_name(cpu::runtime_isa());
  return info;
}

}  // namespace

TORCH_LIBRARY(diffkern, m) {
  m.def("build_info() -> str", &build_info);
}

}  // namespace diffkern
