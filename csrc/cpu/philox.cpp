// The shared Philox stream (csrc/include/diffkern/philox.h) as CPU ops: a [rows, cols] grid of
// float64 uniforms or normals of rows row_start.. and columns 0..cols-1, exactly what
// diffkern.ops.philox.uniforms / normals compute in torch (tests/test_philox.py checks the bits).
// The operator families use it to fill their streams on CPU tensors.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>

#include "diffkern/philox.h"

namespace diffkern {
namespace {

template <typename Variate>
at::Tensor philox_grid(int64_t seed, int64_t offset, int64_t tag, int64_t rows, int64_t cols, int64_t row_start,
                       Variate variate) {
  TORCH_CHECK_VALUE(tag >= 0 && tag < 16, "tag: expected 0 <= tag < 16, got ", tag);
  TORCH_CHECK_VALUE(offset >= 0 && offset < (int64_t(1) << 60), "offset: expected 0 <= offset < 2**60, got ", offset);
  TORCH_CHECK_VALUE(rows >= 0 && cols >= 0 && row_start >= 0, "rows/cols/row_start: expected >= 0, got ", rows,
                    ", ", cols, ", ", row_start);
  auto out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  at::parallel_for(0, rows * cols, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      o[i] = variate(static_cast<uint64_t>(seed), static_cast<uint64_t>(offset), static_cast<uint32_t>(tag),
                     static_cast<uint32_t>(row_start + i / cols), static_cast<uint32_t>(i % cols));
  });
  return out;
}

at::Tensor philox_uniforms(int64_t seed, int64_t offset, int64_t tag, int64_t rows, int64_t cols, int64_t row_start) {
  return philox_grid(seed, offset, tag, rows, cols, row_start,
                     [](auto... key) { return philox::uniform(key...); });
}

at::Tensor philox_normals(int64_t seed, int64_t offset, int64_t tag, int64_t rows, int64_t cols, int64_t row_start) {
  return philox_grid(seed, offset, tag, rows, cols, row_start,
                     [](auto... key) { return philox::normal(key...); });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("philox_uniforms(int seed, int offset, int tag, int rows, int cols, int row_start=0) -> Tensor",
        &philox_uniforms);
  m.def("philox_normals(int seed, int offset, int tag, int rows, int cols, int row_start=0) -> Tensor",
        &philox_normals);
}

}  // namespace diffkern
