// Chebyshev family on CUDA: the snapshot combination
//     out[s, q, n] = sum_k W[s, q, k] * in[s, k, n]
// that serves fit, eval and forecast (csrc/include/diffkern/chebyshev.h explains why). Torch-free:
// raw pointers, element strides, a cudaStream_t and a cudaError_t code; the torch binding is
// csrc/cuda/binding_chebyshev.cpp. Per-element math (fp32 accumulation, conversions) comes from
// the shared header: diffkern::to_float / from_float<T> / cheb::combine_step<QB>, which the CPU
// tests exercise. Nothing here re-implements it.
//
// Launch configuration (diffkern_chebyshev_combine_cuda):
//   block   kThreads = 256 threads (8 warps), 1-D over N.
//   grid.y  min(S, 65535) streams; a block loops s += gridDim.y when S > 65535.
//   grid.x  N-chunks: min(ceil(N / (256 * V)), ceil(resident / grid.y)), resident = SMs x the
//           kernel's occupancy (cudaOccupancyMaxActiveBlocksPerMultiprocessor, >= 3 by the launch
//           bounds below): one resident wave; each block grid-strides over N (stride
//           gridDim.x * 256 * V elements), which amortises the weight staging over many N positions.
//   V       elements per thread per step: 16 bytes of input (f32: 4, f16/bf16: 8, f64: 2) in the
//           vectorized variant (one 16-byte ld.global.nc), 1 in the scalar variant. The vector
//           variant is chosen when `in` is 16-byte aligned, N, in_stride_s, in_stride_k are
//           multiples of V and `out` is aligned to min(16, V * sizeof(Tout)); else scalar.
//   smem    dynamic, panel_rows * K * 4 bytes (<= 48 KiB, no opt-in needed): the block stages a
//           panel of W[s] rows (all Q rows when Q * K <= 12288, else the largest multiple of 4
//           rows that fits) and reads them as warp-wide broadcasts. K > 12288 is rejected with
//           cudaErrorInvalidValue (the binding checks it first and says so).
//   regs    each thread keeps QB <= 4 outputs x V elements of fp32 accumulators (q-blocks of 4
//           rows loop inside the N loop, so the q-blocks after the first re-read the same input
//           lines while they are still in L1/L2); the K loop is unrolled by 2 so two 16-byte
//           loads are in flight. __launch_bounds__(256, 3) caps ptxas at 80 registers so 3 blocks
//           (24 warps) stay resident per SM; measured (nvcc 13.0, sm_80/sm_90): 78-80 for 16-bit
//           inputs (32 accumulators), 54-64 for f32/f64 inputs, 43-48 for the scalar variant,
//           0 spills (tests/compile/test_nvcc.py asserts it).
//
// Instantiations: Tin x Tout in {f32, f16, bf16, f64}^2 x {vector, scalar} = 32 kernels.

#include <cuda_runtime.h>

#include <cstdint>

#include "diffkern/chebyshev.h"
#include "diffkern/common.h"

namespace diffkern {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMinBlocksPerSM = 3;  // launch bounds: <= 80 registers/thread, 24 resident warps/SM
constexpr int kQBlock = 4;
constexpr int64_t kMaxSmemFloats = 12288;  // 48 KiB of staged weights

template <typename T> struct VecWidth { static constexpr int value = 16 / sizeof(T); };

// Copy `Bytes` bytes between registers and aligned global memory in 16/8/4-byte pieces.
template <int Bytes>
__device__ __forceinline__ void store_aligned(void* dst, const void* src) {
  if constexpr (Bytes >= 16) {
#pragma unroll
    for (int c = 0; c < Bytes / 16; ++c) {
      uint4 u;
      memcpy(&u, static_cast<const char*>(src) + 16 * c, 16);
      reinterpret_cast<uint4*>(dst)[c] = u;
    }
  } else if constexpr (Bytes == 8) {
    uint2 u;
    memcpy(&u, src, 8);
    *reinterpret_cast<uint2*>(dst) = u;
  } else if constexpr (Bytes == 4) {
    uint32_t u;
    memcpy(&u, src, 4);
    *reinterpret_cast<uint32_t*>(dst) = u;
  } else {
    memcpy(dst, src, Bytes);
  }
}

// Load V consecutive input elements at x (16-byte aligned when V > 1) as fp32.
template <typename Tin, int V>
__device__ __forceinline__ void load_in(const Tin* x, float (&xf)[V]) {
  Tin raw[V];
  if constexpr (V > 1) {
    static_assert(V * sizeof(Tin) == 16, "the vector variant reads exactly 16 bytes");
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(x));
    memcpy(raw, &u, 16);
  } else {
    raw[0] = x[0];
  }
#pragma unroll
  for (int v = 0; v < V; ++v) xf[v] = to_float(raw[v]);
}

// One q-block of QB output rows at the V elements starting at n: the register-blocked inner loop.
template <int QB, int V, typename Tin, typename Tout>
__device__ __forceinline__ void combine_qblock(const float* w_panel, int64_t K, const Tin* in_s,
                                               int64_t in_stride_k, Tout* out_q, int64_t N, int64_t n) {
  float acc[V][QB];
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int q = 0; q < QB; ++q) acc[v][q] = 0.0f;
  const Tin* x = in_s + n;
#pragma unroll 2
  for (int64_t k = 0; k < K; ++k) {
    float xf[V];
    load_in<Tin, V>(x + k * in_stride_k, xf);
#pragma unroll
    for (int v = 0; v < V; ++v)
      cheb::combine_step<QB>(acc[v], w_panel + k, static_cast<int>(K), xf[v]);
  }
#pragma unroll
  for (int q = 0; q < QB; ++q) {
    Tout o[V];
#pragma unroll
    for (int v = 0; v < V; ++v) o[v] = from_float<Tout>(acc[v][q]);
    Tout* y = out_q + q * N + n;
    if constexpr (V > 1) {
      store_aligned<V * sizeof(Tout)>(y, o);
    } else {
      y[0] = o[0];
    }
  }
}

// grid (N-chunks, S-slots), block kThreads, dynamic smem panel_rows * K floats.
template <typename Tin, typename Tout, int V>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
chebyshev_combine_kernel(const float* DK_RESTRICT weights, const Tin* DK_RESTRICT in, Tout* DK_RESTRICT out,
                    int64_t S, int64_t Q, int64_t K, int64_t N, int64_t in_stride_s, int64_t in_stride_k,
                    int64_t panel_rows) {
  extern __shared__ float w_smem[];
  const int64_t n_first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int64_t n_step = static_cast<int64_t>(gridDim.x) * kThreads * V;
  for (int64_t s = blockIdx.y; s < S; s += gridDim.y) {
    const Tin* in_s = in + s * in_stride_s;
    for (int64_t p0 = 0; p0 < Q; p0 += panel_rows) {
      const int64_t rows = Q - p0 < panel_rows ? Q - p0 : panel_rows;
      __syncthreads();  // the previous panel is no longer read
      const float* w_src = weights + (s * Q + p0) * K;
      for (int64_t i = threadIdx.x; i < rows * K; i += kThreads) w_smem[i] = w_src[i];
      __syncthreads();
      for (int64_t n = n_first; n < N; n += n_step) {
        for (int64_t q0 = 0; q0 < rows; q0 += kQBlock) {
          const float* w_panel = w_smem + q0 * K;
          Tout* out_q = out + (s * Q + p0 + q0) * N;
          switch (rows - q0 < kQBlock ? rows - q0 : kQBlock) {  // register blocking needs QB at compile time
            case 1: combine_qblock<1, V>(w_panel, K, in_s, in_stride_k, out_q, N, n); break;
            case 2: combine_qblock<2, V>(w_panel, K, in_s, in_stride_k, out_q, N, n); break;
            case 3: combine_qblock<3, V>(w_panel, K, in_s, in_stride_k, out_q, N, n); break;
            default: combine_qblock<4, V>(w_panel, K, in_s, in_stride_k, out_q, N, n); break;
          }
        }
      }
    }
  }
}

bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

template <typename Tin, typename Tout>
cudaError_t launch(const float* weights, const void* in_raw, void* out_raw, int64_t S, int64_t Q,
                   int64_t K, int64_t N, int64_t in_stride_s, int64_t in_stride_k, cudaStream_t stream) {
  const Tin* in = static_cast<const Tin*>(in_raw);
  Tout* out = static_cast<Tout*>(out_raw);
  constexpr int V = VecWidth<Tin>::value;
  constexpr int64_t out_align = V * sizeof(Tout) < 16 ? V * sizeof(Tout) : 16;
  const bool vec = aligned(in, 16) && aligned(out, out_align) && N % V == 0 && in_stride_s % V == 0 &&
                   in_stride_k % V == 0;

  int64_t panel_rows = Q;
  if (K > 0 && Q * K > kMaxSmemFloats) {
    panel_rows = kMaxSmemFloats / K;
    if (panel_rows >= kQBlock) panel_rows -= panel_rows % kQBlock;
  }
  const size_t smem = static_cast<size_t>(panel_rows * K) * sizeof(float);

  int device = 0, sms = 0, per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess)
    err = vec ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, chebyshev_combine_kernel<Tin, Tout, V>, kThreads, smem)
              : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, chebyshev_combine_kernel<Tin, Tout, 1>, kThreads, smem);
  if (err != cudaSuccess) return err;

  // One resident wave (occupancy x SMs) over all S-slots; each block then grid-strides over N.
  const int64_t per_block = static_cast<int64_t>(kThreads) * (vec ? V : 1);
  const int64_t grid_y = S < 65535 ? S : 65535;
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * (sms > 0 ? sms : 1);
  const int64_t want_x = (resident + grid_y - 1) / grid_y;
  int64_t grid_x = (N + per_block - 1) / per_block;
  if (grid_x > want_x) grid_x = want_x;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));

  if (vec) {
    chebyshev_combine_kernel<Tin, Tout, V><<<grid, kThreads, smem, stream>>>(
        weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, panel_rows);
  } else {
    chebyshev_combine_kernel<Tin, Tout, 1><<<grid, kThreads, smem, stream>>>(
        weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, panel_rows);
  }
  return cudaGetLastError();
}

template <typename Tin>
cudaError_t launch_out(int out_dtype, const float* weights, const void* in, void* out, int64_t S,
                       int64_t Q, int64_t K, int64_t N, int64_t in_stride_s, int64_t in_stride_k,
                       cudaStream_t stream) {
  switch (static_cast<DType>(out_dtype)) {
    case DType::kFloat32: return launch<Tin, float>(weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream);
    case DType::kFloat16: return launch<Tin, f16_t>(weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream);
    case DType::kBFloat16: return launch<Tin, bf16_t>(weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream);
    case DType::kFloat64: return launch<Tin, double>(weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace cuda
}  // namespace diffkern

// out[s, q, :] = sum_k weights[s, q, k] * in[s, k, :], fp32 accumulation.
//   weights  [S, Q, K] float32, contiguous, device memory
//   in       [S, K, N] of in_dtype, element strides (in_stride_s, in_stride_k, 1)
//   out      [S, Q, N] of out_dtype, contiguous
//   dtypes   diffkern::DType codes (0 f32, 1 f16, 2 bf16, 3 f64)
// Returns a cudaError_t code: cudaSuccess, cudaErrorInvalidValue (bad dtype code, negative sizes,
// K > 12288), or the launch error. Asynchronous on `stream`; nothing is launched for empty outputs.
extern "C" int diffkern_chebyshev_combine_cuda(const float* weights, const void* in, int in_dtype, void* out,
                                          int out_dtype, int64_t S, int64_t Q, int64_t K, int64_t N,
                                          int64_t in_stride_s, int64_t in_stride_k, cudaStream_t stream) {
  using namespace diffkern;
  using namespace diffkern::cuda;
  if (S < 0 || Q < 0 || K < 0 || N < 0 || K > kMaxSmemFloats) return static_cast<int>(cudaErrorInvalidValue);
  if (out_dtype < 0 || out_dtype > 3) return static_cast<int>(cudaErrorInvalidValue);
  if (S == 0 || Q == 0 || N == 0) return static_cast<int>(cudaSuccess);
  cudaError_t err = cudaErrorInvalidValue;
  switch (static_cast<DType>(in_dtype)) {
    case DType::kFloat32: err = launch_out<float>(out_dtype, weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream); break;
    case DType::kFloat16: err = launch_out<f16_t>(out_dtype, weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream); break;
    case DType::kBFloat16: err = launch_out<bf16_t>(out_dtype, weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream); break;
    case DType::kFloat64: err = launch_out<double>(out_dtype, weights, in, out, S, Q, K, N, in_stride_s, in_stride_k, stream); break;
  }
  return static_cast<int>(err);
}
