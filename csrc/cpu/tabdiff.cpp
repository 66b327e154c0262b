// TabDiff's sampler steps on CPU tensors: one pass over the batch per operator, the random
// numbers drawn in the loop from the shared Philox stream (never a [B, L] uniform tensor), and
// the unmask race only for cells that are masked. Per-cell math: csrc/include/diffkern/tabdiff.h.
// Bad values are counted in a status tensor (tabdiff::Status) that the Python finish raises from.
//
// Layouts: x_num [B, n] (float32/float64, unit column stride), x_cat [B, m] int64, logits [B, L]
// (any float dtype, unit column stride), per-column tables float64 [n] or [m]; explicit
// noise/uniforms, when given, float64 contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffkern/philox.h"
#include "diffkern/tabdiff.h"
#include "diffkern/vec_math.h"

#define DK_INLINE inline __attribute__((always_inline))

// The race's vector loops are compiled per ISA and picked at load time (GCC's ifunc clones).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DK_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DK_SIMD_CLONES
#endif

namespace diffkern {
namespace {

constexpr int64_t kRowsPerTask = 64;

struct Key {  // the Philox key of one step
  uint64_t seed, step;
  int64_t row_start;
};

Key make_key(int64_t seed, int64_t step, int64_t row_start) {
  TORCH_CHECK_VALUE(step >= 0 && step < (int64_t(1) << 60), "step: expected 0 <= step < 2**60, got ", step);
  TORCH_CHECK_VALUE(row_start >= 0, "row_start: expected >= 0, got ", row_start);
  return {static_cast<uint64_t>(seed), static_cast<uint64_t>(step), row_start};  // seed: two's complement
}

// Column offsets of the flat logit layout (K_j + 1 wide, MASK last).
std::vector<int64_t> segment_offsets(c10::IntArrayRef num_classes) {
  std::vector<int64_t> offsets;
  int64_t start = 0;
  for (int64_t k : num_classes) {
    offsets.push_back(start);
    start += k + 1;
  }
  return offsets;
}

const double* table(const at::Tensor& t, int64_t width, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() && t.numel() == width, name,
              ": expected a contiguous float64 vector of ", width, " values");
  return t.data_ptr<double>();
}

const double* optional_grid(const c10::optional<at::Tensor>& t, int64_t rows, int64_t cols, const char* name) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() && t->dim() == 2 && t->size(0) == rows &&
                  t->size(1) == cols,
              name, ": expected a contiguous float64 [", rows, ", ", cols, "] tensor");
  return t->data_ptr<double>();
}

// Thread-safe status counters, summed into an int64 [kStatusSlots] tensor at the end.
struct StatusCounts {
  std::atomic<int64_t> slot[tabdiff::kStatusSlots] = {};
  void add(int s, int64_t count) {
    if (count) slot[s].fetch_add(count, std::memory_order_relaxed);
  }
  at::Tensor tensor() const {
    auto out = at::empty({tabdiff::kStatusSlots}, at::TensorOptions().dtype(at::kLong));
    for (int s = 0; s < tabdiff::kStatusSlots; ++s) out.data_ptr<int64_t>()[s] = slot[s].load();
    return out;
  }
};

void check_state(const at::Tensor& x, int64_t rows, const char* name) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == rows, name, ": expected [", rows, ", columns]");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, ": expected unit column stride");
}

// ---------------------------------------------------------------------------------------------
// churn: x_hat = x + sqrt(s_hat^2 - s^2) eps; x_cat_hat = MASK where u < remask_chance
// ---------------------------------------------------------------------------------------------

// philox::normal(seed, step, tag, row_start + b, i) for rows b in [begin, end) and columns i < n,
// stored column-major ([n][end - begin]): the vector loop runs down a column.
DK_SIMD_CLONES void fill_column_normals(Key key, uint32_t tag, int64_t begin, int64_t end, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i)
    vec::philox_normals_down(key.seed, key.step, tag, static_cast<uint32_t>(key.row_start + begin),
                             static_cast<uint32_t>(i), end - begin, out + i * (end - begin));
}

template <typename T>
void churn_rows(const at::Tensor& x_num, const at::Tensor& x_cat, at::Tensor& x_hat, at::Tensor& c_hat,
                const double* sigma_cur, const double* sigma_hat, const double* chance,
                c10::IntArrayRef num_classes, Key key, const double* noise, const double* uniforms,
                StatusCounts& status) {
  const int64_t B = x_num.size(0), n = x_num.size(1), m = x_cat.size(1);
  const T* x = x_num.data_ptr<T>();
  const int64_t* c = x_cat.data_ptr<int64_t>();
  T* xo = x_hat.data_ptr<T>();
  int64_t* co = c_hat.data_ptr<int64_t>();
  const int64_t xs = x_num.stride(0), cs = x_cat.stride(0);
  // Rows in blocks of kRowsPerTask: the block's normals are drawn column by column first (a vector
  // loop down the rows), into a buffer of n x kRowsPerTask that does not grow with B.
  auto churn_block = [&](int64_t begin, int64_t end, double* drawn) -> int64_t {
    if (!noise) fill_column_normals(key, tabdiff::kTagChurn, begin, end, n, drawn);
    int64_t bad = 0;
    for (int64_t b = begin; b < end; ++b) {
      const uint32_t row = static_cast<uint32_t>(key.row_start + b);
      for (int64_t i = 0; i < n; ++i) {
        const double eps = noise ? noise[b * n + i] : drawn[i * (end - begin) + (b - begin)];
        xo[b * n + i] = static_cast<T>(tabdiff::churn_value(static_cast<double>(x[b * xs + i]), sigma_cur[i],
                                                            sigma_hat[i], eps));
      }
      for (int64_t j = 0; j < m; ++j) {
        const int64_t v = c[b * cs + j], K = num_classes[j];
        bad += v < 0 || v > K;
        if (chance[j] <= 0.0 || v == K) {  // no draw can change it: skip the stream
          co[b * m + j] = v;
          continue;
        }
        const double u = uniforms ? uniforms[b * m + j]
                                  : philox::uniform(key.seed, key.step, tabdiff::kTagRemask, row, static_cast<uint32_t>(j));
        co[b * m + j] = u < chance[j] ? K : v;
      }
    }
    return bad;
  };
  at::parallel_for(0, B, kRowsPerTask, [&](int64_t task_begin, int64_t task_end) {
    std::vector<double> drawn(noise ? 0 : n * kRowsPerTask);
    int64_t bad = 0;
    for (int64_t begin = task_begin; begin < task_end; begin += kRowsPerTask)
      bad += churn_block(begin, std::min(task_end, begin + kRowsPerTask), drawn.data());
    status.add(tabdiff::kBadCategory, bad);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tabdiff_churn_kernel(
    const at::Tensor& x_num, const at::Tensor& x_cat, const at::Tensor& sigma_cur, const at::Tensor& sigma_hat,
    const at::Tensor& remask_chance, c10::IntArrayRef num_classes, int64_t seed, int64_t step, int64_t row_start,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& uniforms) {
  const int64_t B = x_num.size(0), n = x_num.size(1), m = x_cat.size(1);
  check_state(x_num, B, "x_num");
  check_state(x_cat, B, "x_cat");
  TORCH_CHECK(x_cat.scalar_type() == at::kLong, "x_cat: expected int64");
  TORCH_CHECK(static_cast<int64_t>(num_classes.size()) == m, "num_classes: expected one count per column");
  auto x_hat = at::empty({B, n}, x_num.options());
  auto c_hat = at::empty({B, m}, x_cat.options());
  StatusCounts status;
  const Key key = make_key(seed, step, row_start);
  AT_DISPATCH_FLOATING_TYPES(x_num.scalar_type(), "tabdiff_churn_kernel", [&] {
    churn_rows<scalar_t>(x_num, x_cat, x_hat, c_hat, table(sigma_cur, n, "sigma_cur"),
                         table(sigma_hat, n, "sigma_hat"), table(remask_chance, m, "remask_chance"), num_classes,
                         key, optional_grid(noise, B, n, "noise"), optional_grid(uniforms, B, m, "uniforms"), status);
  });
  return {x_hat, c_hat, status.tensor()};
}

// ---------------------------------------------------------------------------------------------
// step: Euler update of the numerical cells, unmask race of the masked categorical cells
// ---------------------------------------------------------------------------------------------

// One row's unmask races, vectorised over runs of adjacent masked segments (on Adult's 9 columns
// a segment averages 12 slots, too short for vector loops on its own; a fully masked row is one
// run of L = 113). The math and order of tabdiff::unmask_draw, with vec::exp/log in place of
// libm's, so a draw can differ from the reference's only when two race keys of one cell lie
// within an ulp of each other.
struct Cell {     // a masked cell: its segment and the MASK weight's alpha_s (the gap is per slot)
  int64_t column, offset, K;
  double alpha_s;
  bool bad;       // NaN or +inf in the segment, or every class logit -inf
};
struct Run {      // adjacent masked segments: slots [start, start + length) of the row
  int64_t start, length;
};
struct RowScratch {  // per-slot arrays of one row, O(L) per task (never O(B L))
  std::vector<double> centred, uniform, log_sum, gap, key;
  std::vector<Cell> cells;
  std::vector<Run> runs;
  RowScratch(c10::IntArrayRef num_classes, const std::vector<int64_t>& offsets, const double* alpha_t,
             const double* alpha_s, int64_t L)
      : centred(L), uniform(L), log_sum(L), gap(L), key(L) {
    for (size_t j = 0; j < offsets.size(); ++j)  // the weight gap is a column's, the same in every row
      std::fill(gap.begin() + offsets[j], gap.begin() + offsets[j] + num_classes[j] + 1, alpha_s[j] - alpha_t[j]);
  }
};

// One cell's logits in double, centred on the max class logit (the spec's x - max; the MASK slot
// K gets 0: its softmax terms are never used), and whether the segment is bad.
template <typename Logit>
DK_INLINE bool centre_cell(const Logit* DK_RESTRICT seg, int64_t K,
                                                         double* DK_RESTRICT centred) {
  double max_logit = -INFINITY;
  int bad = 0;
  for (int64_t q = 0; q < K; ++q) {  // scalar: segments are short, vector reductions cost more here
    const double v = tabdiff::as_double(seg[q]);
    centred[q] = v;
    bad |= (v != v) | (v == INFINITY);
    max_logit = v > max_logit ? v : max_logit;
  }
  const double mask_logit = tabdiff::as_double(seg[K]);  // checked, never used
  bad |= (mask_logit != mask_logit) | (mask_logit == INFINITY) | (max_logit == -INFINITY);
#pragma omp simd
  for (int64_t q = 0; q < K; ++q) centred[q] -= max_logit;
  centred[K] = 0.0;
  return bad;
}
// Random numbers, race denominators and softmax numerators of every masked slot: the vector loops.
DK_INLINE void race_vector_pass(const Run* runs, int64_t num_runs, const double* DK_RESTRICT centred,
                                     double* DK_RESTRICT uniform, double* DK_RESTRICT key, Key k, uint32_t row,
                                     bool draw_uniforms) {
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t s0 = runs[r].start, n = runs[r].length;
    if (draw_uniforms) vec::philox_uniforms(k.seed, k.step, tabdiff::kTagUnmask, row, static_cast<uint32_t>(s0), n,
                                            uniform + s0);
#pragma omp simd
    for (int64_t s = s0; s < s0 + n; ++s) {
      uniform[s] = tabdiff::kRaceEps - vec::log_positive(uniform[s] + tabdiff::kRaceEps);  // race denominator
      key[s] = vec::exp_nonpositive(centred[s]);                                           // softmax numerator
    }
  }
}

// key = q / (eps - log(u + eps)) with q = exp(log_softmax) * gap: the spec's (x - max) - log_sum.
DK_INLINE void race_key_pass(const Run* runs, int64_t num_runs, const double* DK_RESTRICT centred,
                                  const double* DK_RESTRICT denominator, const double* DK_RESTRICT log_sum,
                                  const double* DK_RESTRICT gap, double* DK_RESTRICT key) {
  for (int64_t r = 0; r < num_runs; ++r) {
    const int64_t s0 = runs[r].start, n = runs[r].length;
#pragma omp simd
    for (int64_t s = s0; s < s0 + n; ++s)
      key[s] = vec::exp_nonpositive(centred[s] - log_sum[s]) * gap[s] / denominator[s];
  }
}

// Draws of the row's masked cells into out (-1: a bad segment, counted by the caller).
template <typename Logit>
DK_INLINE void race_row_in(const Logit* row_logits, const double* explicit_uniforms, Key k, uint32_t row, RowScratch& w,
              int64_t* out_draw) {
  double *centred = w.centred.data(), *uniform = w.uniform.data(), *log_sum = w.log_sum.data();
  double *key = w.key.data();
  for (Cell& c : w.cells) {
    c.bad = centre_cell(row_logits + c.offset, c.K, centred + c.offset);
    if (explicit_uniforms)
      std::copy(explicit_uniforms + c.offset, explicit_uniforms + c.offset + c.K + 1, uniform + c.offset);
  }
  race_vector_pass(w.runs.data(), w.runs.size(), centred, uniform, key, k, row, explicit_uniforms == nullptr);
  for (const Cell& c : w.cells) {
    double sum = 0.0;
    for (int64_t q = 0; q < c.K; ++q) sum += key[c.offset + q];
    std::fill(log_sum + c.offset, log_sum + c.offset + c.K + 1, std::log(sum));
  }
  race_key_pass(w.runs.data(), w.runs.size(), centred, uniform, log_sum, w.gap.data(), key);
  for (const Cell& c : w.cells) {  // the first maximum in index order, MASK (slot K) last
    if (c.bad) {
      out_draw[c.column] = -1;
      continue;
    }
    const double* cell_key = key + c.offset;
    double class_max = -1.0;  // keys are >= 0: class 0 is always taken first
    int64_t class_best = 0;
    for (int64_t q = 0; q < c.K; ++q) {  // the first maximum in index order, without branches
      const bool above = cell_key[q] > class_max;
      class_max = above ? cell_key[q] : class_max;
      class_best = above ? q : class_best;
    }
    const double mask_key = (1.0 - c.alpha_s) / uniform[c.offset + c.K];  // MASK is last: it loses ties
    const int64_t best = class_max >= mask_key ? class_best : c.K;
    out_draw[c.column] = best;
  }
}

// One clone-dispatched entry per logit type (templates cannot carry target_clones): the whole
// row's race is compiled per ISA, with the vector passes inlined.
#define DK_RACE_ROW(Logit)                                                                                   \
  DK_SIMD_CLONES void race_row(const Logit* row_logits, const double* explicit_uniforms, Key k, uint32_t row, \
                               RowScratch& w, int64_t* out_draw) {                                           \
    race_row_in(row_logits, explicit_uniforms, k, row, w, out_draw);                                         \
  }
DK_RACE_ROW(float)
DK_RACE_ROW(double)
DK_RACE_ROW(bf16_t)
DK_RACE_ROW(f16_t)
#undef DK_RACE_ROW

template <typename T, typename Logit>
void step_rows(const at::Tensor& x_hat, const at::Tensor& c_hat, const at::Tensor& denoised, const at::Tensor& logits,
               at::Tensor& x_next, at::Tensor& c_next, at::Tensor& slope, const double* sigma_hat,
               const double* sigma_next, c10::IntArrayRef num_classes, const std::vector<int64_t>& offsets,
               const double* alpha_t, const double* alpha_s, Key key, const double* uniforms, StatusCounts& status) {
  const int64_t B = x_hat.size(0), n = x_hat.size(1), m = c_hat.size(1), L = logits.size(1);
  const T* x = x_hat.data_ptr<T>();
  const T* den = denoised.data_ptr<T>();
  const int64_t* c = c_hat.data_ptr<int64_t>();
  const Logit* lg = static_cast<const Logit*>(logits.const_data_ptr());
  T* xo = x_next.data_ptr<T>();
  T* dout = slope.data_ptr<T>();
  int64_t* co = c_next.data_ptr<int64_t>();
  const int64_t xs = x_hat.stride(0), ds = denoised.stride(0), cs = c_hat.stride(0), ls = logits.stride(0);
  at::parallel_for(0, B, kRowsPerTask, [&](int64_t begin, int64_t end) {
    RowScratch scratch(num_classes, offsets, alpha_t, alpha_s, L);
    int64_t bad_cat = 0, bad_den = 0, bad_logit = 0;
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t i = 0; i < n; ++i) {
        const double D = static_cast<double>(den[b * ds + i]);
        bad_den += !std::isfinite(D);
        double d;
        xo[b * n + i] = static_cast<T>(tabdiff::euler_value(static_cast<double>(x[b * xs + i]), D, sigma_hat[i],
                                                             sigma_next[i], d));
        dout[b * n + i] = static_cast<T>(d);
      }
      scratch.cells.clear();
      scratch.runs.clear();
      for (int64_t j = 0; j < m; ++j) {
        const int64_t v = c[b * cs + j], K = num_classes[j];
        co[b * m + j] = v;
        if (v != K) {  // decoded earlier: copied (the copy flag); no random numbers drawn
          bad_cat += v < 0 || v > K;
          continue;
        }
        scratch.cells.push_back({j, offsets[j], K, alpha_s[j], false});
        if (!scratch.runs.empty() && scratch.runs.back().start + scratch.runs.back().length == offsets[j])
          scratch.runs.back().length += K + 1;
        else
          scratch.runs.push_back({offsets[j], K + 1});
      }
      if (scratch.cells.empty()) continue;
      race_row(lg + b * ls, uniforms ? uniforms + b * L : nullptr, key, static_cast<uint32_t>(key.row_start + b),
               scratch, co + b * m);
      for (const Cell& cell : scratch.cells) {
        const bool bad = co[b * m + cell.column] < 0;
        bad_logit += bad;
        if (bad) co[b * m + cell.column] = cell.K;
      }
    }
    status.add(tabdiff::kBadCategory, bad_cat);
    status.add(tabdiff::kNonFiniteDenoised, bad_den);
    status.add(tabdiff::kBadLogit, bad_logit);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tabdiff_step_kernel(
    const at::Tensor& x_num_hat, const at::Tensor& x_cat_hat, const at::Tensor& denoised, const at::Tensor& logits,
    const at::Tensor& sigma_hat, const at::Tensor& sigma_next, c10::IntArrayRef num_classes, const at::Tensor& alpha_t,
    const at::Tensor& alpha_s, int64_t seed, int64_t step, int64_t row_start,
    const c10::optional<at::Tensor>& uniforms) {
  const int64_t B = x_num_hat.size(0), n = x_num_hat.size(1), m = x_cat_hat.size(1), L = logits.size(1);
  check_state(x_num_hat, B, "x_num_hat");
  check_state(x_cat_hat, B, "x_cat_hat");
  check_state(denoised, B, "denoised");
  check_state(logits, B, "logits");
  TORCH_CHECK(denoised.scalar_type() == x_num_hat.scalar_type(), "denoised: expected the dtype of x_num_hat");
  TORCH_CHECK(static_cast<int64_t>(num_classes.size()) == m, "num_classes: expected one count per column");
  const auto offsets = segment_offsets(num_classes);
  TORCH_CHECK(m == 0 || offsets.back() + num_classes.back() + 1 == L, "logits: expected sum(K_j + 1) columns");
  auto x_next = at::empty({B, n}, x_num_hat.options());
  auto slope = at::empty({B, n}, x_num_hat.options());
  auto c_next = at::empty({B, m}, x_cat_hat.options());
  StatusCounts status;
  const Key key = make_key(seed, step, row_start);
  const double* u = optional_grid(uniforms, B, L, "uniforms");
  AT_DISPATCH_FLOATING_TYPES(x_num_hat.scalar_type(), "tabdiff_step_kernel", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "tabdiff_step_logits", [&] {
      using Logit = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, bf16_t,
                                       std::conditional_t<std::is_same_v<scalar_t, at::Half>, f16_t, scalar_t>>;
      step_rows<T, Logit>(x_num_hat, x_cat_hat, denoised, logits, x_next, c_next, slope,
                          table(sigma_hat, n, "sigma_hat"), table(sigma_next, n, "sigma_next"), num_classes, offsets,
                          table(alpha_t, m, "alpha_t"), table(alpha_s, m, "alpha_s"), key, u, status);
    });
  });
  return {x_next, c_next, slope, status.tensor()};
}

// ---------------------------------------------------------------------------------------------
// heun: second-order correction; observe: RePaint merge of observed and sampled cells
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> tabdiff_heun_kernel(const at::Tensor& x_num_hat, const at::Tensor& x_next,
                                                       const at::Tensor& denoised_next, const at::Tensor& d,
                                                       const at::Tensor& sigma_hat, const at::Tensor& sigma_next) {
  const int64_t B = x_num_hat.size(0), n = x_num_hat.size(1);
  for (const auto* t : {&x_num_hat, &x_next, &denoised_next, &d}) {
    check_state(*t, B, "x_num_hat/x_next/denoised_next/d");
    TORCH_CHECK(t->scalar_type() == x_num_hat.scalar_type(), "x_next/denoised_next/d: expected x_num_hat's dtype");
  }
  auto out = at::empty({B, n}, x_num_hat.options());
  StatusCounts status;
  const double* sh = table(sigma_hat, n, "sigma_hat");
  const double* sn = table(sigma_next, n, "sigma_next");
  AT_DISPATCH_FLOATING_TYPES(x_num_hat.scalar_type(), "tabdiff_heun_kernel", [&] {
    const scalar_t *xh = x_num_hat.data_ptr<scalar_t>(), *xn = x_next.data_ptr<scalar_t>(),
                   *dn = denoised_next.data_ptr<scalar_t>(), *dd = d.data_ptr<scalar_t>();
    const int64_t s0 = x_num_hat.stride(0), s1 = x_next.stride(0), s2 = denoised_next.stride(0), s3 = d.stride(0);
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, kRowsPerTask * 4, [&](int64_t begin, int64_t end) {
      int64_t bad = 0;
      for (int64_t b = begin; b < end; ++b)
        for (int64_t i = 0; i < n; ++i) {
          const double D = static_cast<double>(dn[b * s2 + i]);
          bad += !std::isfinite(D);
          o[b * n + i] = static_cast<scalar_t>(tabdiff::heun_value(
              static_cast<double>(xh[b * s0 + i]), static_cast<double>(xn[b * s1 + i]), D,
              static_cast<double>(dd[b * s3 + i]), sh[i], sn[i]));
        }
      status.add(tabdiff::kNonFiniteDenoised, bad);
    });
  });
  return {out, status.tensor()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tabdiff_observe_kernel(
    const at::Tensor& z_num, const at::Tensor& z_cat, const at::Tensor& x_obs_num, const at::Tensor& x_obs_cat,
    const at::Tensor& num_missing, const at::Tensor& cat_missing, const at::Tensor& sigma_next,
    const at::Tensor& mask_chance, c10::IntArrayRef num_classes, int64_t seed, int64_t step, int64_t row_start,
    const c10::optional<at::Tensor>& noise, const c10::optional<at::Tensor>& uniforms) {
  const int64_t B = z_num.size(0), n = z_num.size(1), m = z_cat.size(1);
  for (const auto* t : {&z_num, &x_obs_num}) {
    check_state(*t, B, "z_num/x_obs_num");
    TORCH_CHECK(t->scalar_type() == z_num.scalar_type(), "x_obs_num: expected z_num's dtype");
  }
  for (const auto* t : {&z_cat, &x_obs_cat}) check_state(*t, B, "z_cat/x_obs_cat");
  auto nm = num_missing.contiguous(), cm = cat_missing.contiguous();
  auto out_num = at::empty({B, n}, z_num.options());
  auto out_cat = at::empty({B, m}, z_cat.options());
  StatusCounts status;
  const Key key = make_key(seed, step, row_start);
  const double* sn = table(sigma_next, n, "sigma_next");
  const double* chance = table(mask_chance, m, "mask_chance");
  const double* eps = optional_grid(noise, B, n, "noise");
  const double* u = optional_grid(uniforms, B, m, "uniforms");
  AT_DISPATCH_FLOATING_TYPES(z_num.scalar_type(), "tabdiff_observe_kernel", [&] {
    const scalar_t *z = z_num.data_ptr<scalar_t>(), *xo = x_obs_num.data_ptr<scalar_t>();
    const int64_t *zc = z_cat.data_ptr<int64_t>(), *xc = x_obs_cat.data_ptr<int64_t>();
    const bool *miss_n = nm.data_ptr<bool>(), *miss_c = cm.data_ptr<bool>();
    const int64_t zs = z_num.stride(0), os = x_obs_num.stride(0), zcs = z_cat.stride(0), ocs = x_obs_cat.stride(0);
    scalar_t* on = out_num.data_ptr<scalar_t>();
    int64_t* oc = out_cat.data_ptr<int64_t>();
    at::parallel_for(0, B, kRowsPerTask, [&](int64_t begin, int64_t end) {
      int64_t bad = 0;
      for (int64_t b = begin; b < end; ++b) {
        const uint32_t row = static_cast<uint32_t>(key.row_start + b);
        for (int64_t i = 0; i < n; ++i) {
          if (miss_n[b * n + i]) {
            on[b * n + i] = z[b * zs + i];
            continue;
          }
          const double e = eps ? eps[b * n + i]
                               : philox::normal(key.seed, key.step, tabdiff::kTagObserved, row, static_cast<uint32_t>(i));
          on[b * n + i] = static_cast<scalar_t>(static_cast<double>(xo[b * os + i]) + sn[i] * e);
        }
        for (int64_t j = 0; j < m; ++j) {
          const int64_t v = xc[b * ocs + j], K = num_classes[j];
          bad += v < 0 || v > K;
          if (miss_c[b * m + j]) {
            oc[b * m + j] = zc[b * zcs + j];
            continue;
          }
          const double uu = u ? u[b * m + j]
                              : philox::uniform(key.seed, key.step, tabdiff::kTagObserved, row,
                                                static_cast<uint32_t>(n + j));
          oc[b * m + j] = uu < chance[j] ? K : v;
        }
      }
      status.add(tabdiff::kBadCategory, bad);
    });
  });
  return {out_num, out_cat, status.tensor()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("tabdiff_churn_kernel(Tensor x_num, Tensor x_cat, Tensor sigma_cur, Tensor sigma_hat, Tensor remask_chance, "
        "int[] num_classes, int seed, int step, int row_start, Tensor? noise, Tensor? uniforms) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("tabdiff_step_kernel(Tensor x_num_hat, Tensor x_cat_hat, Tensor denoised, Tensor logits, Tensor sigma_hat, "
        "Tensor sigma_next, int[] num_classes, Tensor alpha_t, Tensor alpha_s, int seed, int step, int row_start, "
        "Tensor? uniforms) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("tabdiff_heun_kernel(Tensor x_num_hat, Tensor x_next, Tensor denoised_next, Tensor d, Tensor sigma_hat, "
        "Tensor sigma_next) -> (Tensor, Tensor)");
  m.def("tabdiff_observe_kernel(Tensor z_num, Tensor z_cat, Tensor x_obs_num, Tensor x_obs_cat, Tensor num_missing, "
        "Tensor cat_missing, Tensor sigma_next, Tensor mask_chance, int[] num_classes, int seed, int step, "
        "int row_start, Tensor? noise, Tensor? uniforms) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("tabdiff_churn_kernel", &tabdiff_churn_kernel);
  m.impl("tabdiff_step_kernel", &tabdiff_step_kernel);
  m.impl("tabdiff_heun_kernel", &tabdiff_heun_kernel);
  m.impl("tabdiff_observe_kernel", &tabdiff_observe_kernel);
}

}  // namespace diffkern
