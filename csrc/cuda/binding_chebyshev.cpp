// CUDA binding of diffkern::chebyshev_combine_kernel (schema in csrc/cpu/chebyshev.cpp). Thin on purpose:
// argument checks, device guard, current stream, output allocation, one call into the torch-free
// launcher in chebyshev_kernels.cu. Built only with a CUDA torch (setup.py, DIFFKERN_WITH_CUDA).
// chebyshev_weights_kernel / chebyshev_basis_kernel stay CPU ops; the Python side moves the small float32 weights tensor
// to the feats device before calling chebyshev_combine_kernel.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>

#include "diffkern/common.h"

extern "C" int diffkern_chebyshev_combine_cuda(const float* weights, const void* in, int in_dtype, void* out,
                                          int out_dtype, int64_t S, int64_t Q, int64_t K, int64_t N,
                                          int64_t in_stride_s, int64_t in_stride_k, cudaStream_t stream);

namespace diffkern {
namespace {

constexpr int64_t kMaxK = 12288;  // the launcher stages >= 1 weight row of K floats in 48 KiB of smem

int dtype_code(at::ScalarType t, const char* name) {
  switch (t) {
    case at::kFloat: return static_cast<int>(DType::kFloat32);
    case at::kHalf: return static_cast<int>(DType::kFloat16);
    case at::kBFloat16: return static_cast<int>(DType::kBFloat16);
    case at::kDouble: return static_cast<int>(DType::kFloat64);
    default: TORCH_CHECK(false, name, ": expected float32, float16, bfloat16 or float64, got ", t);
  }
  return -1;
}

at::Tensor chebyshev_combine_cuda(const at::Tensor& weights, const at::Tensor& feats, at::ScalarType out_dtype) {
  TORCH_CHECK(feats.is_cuda(), "feats: expected a CUDA tensor, got device ", feats.device());
  TORCH_CHECK(weights.device() == feats.device(), "weights: expected device ", feats.device(),
              " (same as feats), got ", weights.device());
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 3 && weights.is_contiguous(),
              "weights: expected a contiguous float32 [S, Q, K] tensor, got ", weights.scalar_type(), " ",
              weights.sizes());
  TORCH_CHECK(feats.dim() == 3, "feats: expected [S, K, N], got ", feats.sizes());
  TORCH_CHECK(weights.size(0) == feats.size(0) && weights.size(2) == feats.size(1), "weights ",
              weights.sizes(), " do not match feats ", feats.sizes(), " (expected [S, Q, K] against [S, K, N])");
  TORCH_CHECK(feats.size(2) <= 1 || feats.stride(2) == 1, "feats: N must have unit stride, got strides ",
              feats.strides());
  TORCH_CHECK(feats.size(1) <= kMaxK, "feats: the CUDA kernel supports K <= ", kMaxK, " snapshots, got K=",
              feats.size(1));
  const int in_code = dtype_code(feats.scalar_type(), "feats");
  const int out_code = dtype_code(out_dtype, "out_dtype");

  const c10::cuda::CUDAGuard guard(feats.device());
  auto out = at::empty({feats.size(0), weights.size(1), feats.size(2)}, feats.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const int err = diffkern_chebyshev_combine_cuda(
      weights.data_ptr<float>(), feats.const_data_ptr(), in_code, out.data_ptr(), out_code, feats.size(0),
      weights.size(1), feats.size(1), feats.size(2), feats.stride(0), feats.stride(1),
      c10::cuda::getCurrentCUDAStream(feats.device().index()).stream());
  TORCH_CHECK(err == 0, "chebyshev_combine_kernel (CUDA): kernel launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(diffkern, CUDA, m) {
  m.impl("chebyshev_combine_kernel", &chebyshev_combine_cuda);
}

}  // namespace diffkern
