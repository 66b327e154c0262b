// A streaming-read probe: sums a large float32 buffer as fast as this machine can read it.
// `diffkern bench` reports every bandwidth-bound kernel as a fraction of this ceiling,
// measured in the same run (absolute GB/s drift on shared machines; ratios do not).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd_dispatch.h"

namespace diffkern {
namespace {

constexpr int kLanes = 64;  // independent partial sums: enough for the vectorizer to hide latency

inline __attribute__((always_inline)) void sum_range_impl(const float* x, int64_t begin, int64_t end,
                                                          double* result) {
  float partial[kLanes] = {0.0f};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int l = 0; l < kLanes; ++l) partial[l] += x[i + l];
  float total = 0.0f;
  for (; i < end; ++i) total += x[i];
  for (int l = 0; l < kLanes; ++l) total += partial[l];
  *result = total;
}

DK_ISA_CLONES(, sum_range, (const float* x, int64_t begin, int64_t end, double* result), , (x, begin, end, result))

at::Tensor stream_read_probe(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "stream_read_probe: expected a contiguous float32 CPU tensor");
  const int64_t n = x.numel();
  const int64_t grain = 1 << 20;
  const int64_t blocks = (n + grain - 1) / grain;
  std::vector<double> sums(blocks, 0.0);
  const float* data = x.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) sum_range(data, b * grain, std::min(n, (b + 1) * grain), &sums[b]);
  });
  double total = 0.0;
  for (double s : sums) total += s;
  return at::scalar_tensor(total, x.options().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("stream_read_probe(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("stream_read_probe", &stream_read_probe);
}

}  // namespace diffkern
