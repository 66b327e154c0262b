// Chebyshev family on the CPU: fp64 host weight solves (csrc/include/diffkern/chebyshev.h) and
// the snapshot combination out[s, q, :] = sum_k W[s, q, k] in[s, k, :] that serves fit, eval
// and forecast in one bandwidth-bound pass, parallel over (stream, N-chunk) tasks.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "diffkern/chebyshev.h"
#include "simd_dispatch.h"
#include "vec16.h"

namespace diffkern {
namespace {

// ---- weights (tiny, host, fp64) ------------------------------------------------------------

cheb::RidgeProblem make_problem(int64_t degree, double lam, double t_min, double t_max,
                                bool penalize_intercept) {
  TORCH_CHECK(degree >= 0 && degree <= cheb::kMaxDegree, "degree: expected 0..", cheb::kMaxDegree,
              ", got ", degree);
  TORCH_CHECK(lam >= 0.0, "lam: expected >= 0, got ", lam);
  TORCH_CHECK(t_min < t_max, "t_range: expected t_min < t_max, got (", t_min, ", ", t_max, ")");
  return {static_cast<int>(degree), lam, t_min, t_max, penalize_intercept};
}

void check_host_f64(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.dim() == 2 && t.is_contiguous(),
              name, ": expected a contiguous float64 CPU tensor [S, L], got ", t.scalar_type(), " ",
              t.sizes(), " on ", t.device());
}

// [S, P, K] fit operator (t_query absent) or [S, Q, K] forecast weights, float64.
at::Tensor chebyshev_weights_kernel(const at::Tensor& times, const c10::optional<at::Tensor>& t_query,
                        int64_t degree, double lam, double t_min, double t_max, double blend,
                        bool penalize_intercept) {
  check_host_f64(times, "times");
  const auto pb = make_problem(degree, lam, t_min, t_max, penalize_intercept);
  const int64_t S = times.size(0), K = times.size(1);
  TORCH_CHECK(K >= 1, "times: expected K >= 1, got ", times.sizes());
  TORCH_CHECK(blend == 1.0 || K >= 2, "blend < 1 needs K >= 2 snapshots, got K=", K);
  const bool forecast = t_query.has_value();
  if (forecast) {
    check_host_f64(*t_query, "t_query");
    TORCH_CHECK(t_query->size(0) == S, "t_query: expected S=", S, " rows, got ", t_query->sizes());
  }
  const int64_t rows = forecast ? t_query->size(1) : degree + 1;
  auto out = at::empty({S, rows, K}, times.options());
  const double* t = times.data_ptr<double>();
  double* w = out.data_ptr<double>();
  for (int64_t s = 0; s < S; ++s) {
    const bool ok = forecast
        ? cheb::forecast_weights(t + s * K, K, t_query->data_ptr<double>() + s * rows, rows, pb, blend,
                                 w + s * rows * K)
        : cheb::ridge_operator(t + s * K, K, pb, w + s * rows * K);
    TORCH_CHECK_VALUE(ok, "times: the ridge normal equations of stream ", s, " are singular (lam=", lam,
                ", K=", K, ", degree=", degree, "); use lam > 0 or more distinct times");
  }
  return out;
}

// [S, Q, P] Chebyshev basis at the query times, float64.
at::Tensor chebyshev_basis_kernel(const at::Tensor& t_query, int64_t degree, double t_min, double t_max) {
  check_host_f64(t_query, "t_query");
  make_problem(degree, 0.0, t_min, t_max, true);
  const int64_t P = degree + 1;
  auto out = at::empty({t_query.size(0), t_query.size(1), P}, t_query.options());
  const double* t = t_query.data_ptr<double>();
  double* b = out.data_ptr<double>();
  for (int64_t i = 0; i < t_query.numel(); ++i)
    cheb::basis(cheb::tau_of(t[i], t_min, t_max), static_cast<int>(degree), b + i * P);
  return out;
}

// ---- the combination (bandwidth-bound) ----------------------------------------------------

constexpr int64_t kChunk = 16384;  // elements of N per parallel task
constexpr int64_t kTile = 64;      // elements whose accumulators live in registers
constexpr int kQBlock = 4;         // outputs produced per read of the inputs
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead of the tile each input row is prefetched

template <typename Tin, typename Tout>
struct CombineArgs {
  const float* weights;  // [S, Q, K] contiguous
  const Tin* in;         // [S, K, N], N contiguous
  Tout* out;             // [S, Q, N] contiguous
  int64_t S, Q, K, N, in_stride_s, in_stride_k, chunks_per_stream;
};

// One tile of kTile elements for a block of QN outputs. All K input rows are read in
// lockstep, so each row is one sequential stream the hardware prefetcher follows (a
// row-at-a-time order restarts it at every page), and the QN x 4 accumulators stay in registers.
// bf16 rows are read as even/odd pairs (vec16.h's load32_pairs: no shuffles, the conversion
// is two integer ops per 16 elements); the outputs are written back in element order.
template <int QN, bool Streaming, typename Tin, typename Tout>
inline __attribute__((always_inline)) void combine_full_tile(const CombineArgs<Tin, Tout>& a, int64_t s,
                                                             int64_t q0, int64_t n) {
  using cpu::v16f;
  constexpr int kVecs = kTile / 16;
  constexpr bool kPairs = std::is_same_v<Tin, bf16_t>;  // acc[q][2p], acc[q][2p+1]: even, odd of 32
  v16f acc[QN][kVecs];
  for (int q = 0; q < QN; ++q)
    for (int v = 0; v < kVecs; ++v) acc[q][v] = v16f{};
  const Tin* base = a.in + s * a.in_stride_s + n;
  const float* w = a.weights + (s * a.Q + q0) * a.K;
  for (int64_t k = 0; k < a.K; ++k) {
    const Tin* x = base + k * a.in_stride_k;
    const char* ahead = reinterpret_cast<const char*>(x) + kPrefetchBytes;
    for (size_t line = 0; line < kTile * sizeof(Tin); line += 64) __builtin_prefetch(ahead + line);
    v16f xv[kVecs];
    if constexpr (kPairs) {
      for (int v = 0; v < kVecs; v += 2) cpu::load32_pairs(x + 16 * v, xv[v], xv[v + 1]);
    } else {
      for (int v = 0; v < kVecs; ++v) xv[v] = cpu::load16(x + 16 * v);
    }
    for (int q = 0; q < QN; ++q) {
      const float wq = w[q * a.K + k];
      for (int v = 0; v < kVecs; ++v) acc[q][v] += wq * xv[v];  // contracted to FMA (-ffp-contract=fast)
    }
  }
  for (int q = 0; q < QN; ++q) {
    Tout* y = a.out + (s * a.Q + q0 + q) * a.N + n;
    if constexpr (kPairs) {
      for (int v = 0; v < kVecs; v += 2) {
        if constexpr (Streaming) cpu::stream32_pairs(y + 16 * v, acc[q][v], acc[q][v + 1]);
        else cpu::store32_pairs(y + 16 * v, acc[q][v], acc[q][v + 1]);
      }
    } else {
      for (int v = 0; v < kVecs; ++v) {
        if constexpr (Streaming) cpu::stream16(y + 16 * v, acc[q][v]);
        else cpu::store16(y + 16 * v, acc[q][v]);
      }
    }
  }
}

// The ragged end of a row (< kTile elements), element by element.
template <typename Tin, typename Tout>
inline __attribute__((always_inline)) void combine_tail(const CombineArgs<Tin, Tout>& a, int64_t s,
                                                        int64_t q0, int64_t qn, int64_t n, int64_t len) {
  for (int64_t q = q0; q < q0 + qn; ++q) {
    const float* w = a.weights + (s * a.Q + q) * a.K;
    for (int64_t i = 0; i < len; ++i) {
      float acc[1] = {0.0f};
      for (int64_t k = 0; k < a.K; ++k)
        cheb::combine_step<1>(acc, w + k, 0, to_float(a.in[s * a.in_stride_s + k * a.in_stride_k + n + i]));
      a.out[(s * a.Q + q) * a.N + n + i] = from_float<Tout>(acc[0]);
    }
  }
}

// Non-temporal stores need 64-byte aligned output tiles (the tile start of each output row).
template <typename Tin, typename Tout>
inline __attribute__((always_inline)) bool stream_ok(const CombineArgs<Tin, Tout>& a, int64_t s, int64_t q0, int64_t n) {
  return reinterpret_cast<uintptr_t>(a.out + (s * a.Q + q0) * a.N + n) % 64 == 0 && (a.N * sizeof(Tout)) % 64 == 0;
}

template <bool Streaming, typename Tin, typename Tout>
inline __attribute__((always_inline)) void combine_tasks_impl(const CombineArgs<Tin, Tout>& a,
                                                              int64_t begin, int64_t end) {
  for (int64_t task = begin; task < end; ++task) {
    const int64_t s = task / a.chunks_per_stream;
    const int64_t n_begin = (task % a.chunks_per_stream) * kChunk;
    const int64_t n_end = std::min(a.N, n_begin + kChunk);
    for (int64_t q0 = 0; q0 < a.Q; q0 += kQBlock) {
      const int64_t qn = std::min<int64_t>(kQBlock, a.Q - q0);
      for (int64_t n = n_begin; n < n_end; n += kTile) {
        if (n_end - n < kTile) {
          combine_tail(a, s, q0, qn, n, n_end - n);
          continue;
        }
        switch (qn) {  // register blocking needs the block size at compile time
          case 1: (stream_ok(a, s, q0, n) ? combine_full_tile<1, Streaming>(a, s, q0, n) : combine_full_tile<1, false>(a, s, q0, n)); break;
          case 2: (stream_ok(a, s, q0, n) ? combine_full_tile<2, Streaming>(a, s, q0, n) : combine_full_tile<2, false>(a, s, q0, n)); break;
          case 3: (stream_ok(a, s, q0, n) ? combine_full_tile<3, Streaming>(a, s, q0, n) : combine_full_tile<3, false>(a, s, q0, n)); break;
          default: (stream_ok(a, s, q0, n) ? combine_full_tile<4, Streaming>(a, s, q0, n) : combine_full_tile<4, false>(a, s, q0, n)); break;
        }
      }
    }
  }
}

// Clones per ISA (see simd_dispatch.h). Only the AVX-512 clone streams its output past the
// caches (non-temporal stores): a fresh output line is otherwise read before it is written.
template <typename Tin, typename Tout>
DK_TARGET_AVX512 void combine_tasks_avx512(const CombineArgs<Tin, Tout>& a, int64_t begin, int64_t end) {
  combine_tasks_impl<cpu::kCanStream<Tout>>(a, begin, end);
  if constexpr (cpu::kCanStream<Tout>) cpu::stream_fence();
}
template <typename Tin, typename Tout>
DK_TARGET_AVX2 void combine_tasks_avx2(const CombineArgs<Tin, Tout>& a, int64_t begin, int64_t end) {
  combine_tasks_impl<false>(a, begin, end);
}
template <typename Tin, typename Tout>
void combine_tasks_default(const CombineArgs<Tin, Tout>& a, int64_t begin, int64_t end) {
  combine_tasks_impl<false>(a, begin, end);
}
template <typename Tin, typename Tout>
void combine_tasks(const CombineArgs<Tin, Tout>& a, int64_t begin, int64_t end) {
  switch (cpu::runtime_isa()) {
    case cpu::Isa::kAvx512: return combine_tasks_avx512(a, begin, end);
    case cpu::Isa::kAvx2: return combine_tasks_avx2(a, begin, end);
    default: return combine_tasks_default(a, begin, end);
  }
}

template <typename T> struct Storage { using type = T; };
template <> struct Storage<at::BFloat16> { using type = bf16_t; };
template <> struct Storage<at::Half> { using type = f16_t; };

template <typename Tin, typename Tout>
void combine_typed(const at::Tensor& weights, const at::Tensor& in, at::Tensor& out) {
  using In = typename Storage<Tin>::type;
  using Out = typename Storage<Tout>::type;
  CombineArgs<In, Out> a{weights.data_ptr<float>(),
                         reinterpret_cast<const In*>(in.data_ptr<Tin>()),
                         reinterpret_cast<Out*>(out.data_ptr<Tout>()),
                         in.size(0), weights.size(1), in.size(1), in.size(2),
                         in.stride(0), in.stride(1), (in.size(2) + kChunk - 1) / kChunk};
  const int64_t tasks = a.S * a.chunks_per_stream;
  if (tasks == 0 || a.Q == 0) return;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) { combine_tasks(a, begin, end); });
}

// Ask Linux to back a large fresh output with 2 MiB pages: first-touch faults on a 4 KiB-paged
// 25 MB forecast cost about a third of the read time of the whole pass (the same effect as
// torch's THP_MEM_ALLOC_ENABLE, applied only to the buffers this op allocates). Advisory only.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

at::Tensor chebyshev_combine_kernel(const at::Tensor& weights, const at::Tensor& in, at::ScalarType out_dtype) {
  TORCH_CHECK(in.device().is_cpu() && weights.device().is_cpu(), "chebyshev_combine_kernel (CPU): expected CPU tensors");
  TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.dim() == 3 && weights.is_contiguous(),
              "weights: expected a contiguous float32 [S, Q, K] tensor, got ", weights.scalar_type(), " ",
              weights.sizes());
  TORCH_CHECK(in.dim() == 3, "feats: expected [S, K, N], got ", in.sizes());
  TORCH_CHECK(weights.size(0) == in.size(0) && weights.size(2) == in.size(1), "weights ", weights.sizes(),
              " do not match feats ", in.sizes(), " (expected [S, Q, K] against [S, K, N])");
  TORCH_CHECK(in.size(2) <= 1 || in.stride(2) == 1, "feats: N must have unit stride, got strides ",
              in.strides());
  auto out = at::empty({in.size(0), weights.size(1), in.size(2)}, in.options().dtype(out_dtype));
  advise_huge_pages(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, in.scalar_type(), "chebyshev_combine_in", [&] {
    using Tin = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "chebyshev_combine_out", [&] {
      combine_typed<Tin, scalar_t>(weights, in, out);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("chebyshev_weights_kernel(Tensor times, Tensor? t_query, int degree, float lam, float t_min, float t_max, "
        "float blend, bool penalize_intercept) -> Tensor");
  m.def("chebyshev_basis_kernel(Tensor t_query, int degree, float t_min, float t_max) -> Tensor");
  m.def("chebyshev_combine_kernel(Tensor weights, Tensor feats, ScalarType out_dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("chebyshev_weights_kernel", &chebyshev_weights_kernel);
  m.impl("chebyshev_basis_kernel", &chebyshev_basis_kernel);
  m.impl("chebyshev_combine_kernel", &chebyshev_combine_kernel);
}

}  // namespace diffkern
