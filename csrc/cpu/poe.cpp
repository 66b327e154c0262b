// CPU kernels of the PoE operator family (see pyglue/ops/poe.py for the math, the RNG contract
// and the fast backends' contract: kernels return status counters, Python raises and finishes).
//
//   poe_draft_kernel    one task per (b, j) DLM row, read once for all K particles: convert to fp32
//                       into an L2-resident row buffer, max, then per particle exp / radix-select
//                       top-p nucleus (no sort) / block-sum inverse CDF in token-id order.
//   poe_verify_kernel   one task per (b, k, j) row: a single streaming pass over L1-sized chunks of
//                       l_D and l_AR computing the online (max, sum-exp) of the proposal, the PoE
//                       target and the AR target, gathers at the draft; a sequential acceptance scan
//                       per (b, k); a second pass only on the <= B*K rows that need a residual sample.
//   product_of_experts_kernel  fused log_softmax(sum_i w_i l_i / T).
//
// Hot loops are always-inline templates instantiated per ISA (simd_dispatch.h) and written so
// gcc auto-vectorises them (lane-array reductions, branch-free polynomial exp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "diffkern/poe.h"
#include "simd_dispatch.h"

namespace diffkern {
namespace {

using poe::fast_exp;
using poe::float_key;
using poe::MaxSum;

constexpr int64_t kChunk = 2048;   // L1-resident chunk of the streaming pass
constexpr int64_t kBlock = 256;    // block of the block-sum inverse CDF
constexpr int kLanes = 16;

#define DK_AI inline __attribute__((always_inline))

// ---------------------------------------------------------------------------------------------
// Elementwise building blocks (auto-vectorised inside each ISA clone)
// ---------------------------------------------------------------------------------------------

struct Flags {
  int64_t nan = 0;
  int64_t pinf = 0;
  int64_t empty = 0;  // the row is entirely -inf
};

template <typename T>
DK_AI float to_f32(T v) { return static_cast<float>(v); }
template <>
DK_AI float to_f32<c10::BFloat16>(c10::BFloat16 v) { return to_float(bf16_t{v.x}); }

// out[i] = float(in[i]) with NaN -> -inf; counts NaN and +inf.
template <typename T>
DK_AI void load_row(const T* __restrict in, float* __restrict out, int64_t n, Flags& f) {
  int32_t nan_l[kLanes] = {0}, inf_l[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float x = to_f32(in[i + l]);
      const bool isnan = x != x;
      nan_l[l] += isnan;
      inf_l[l] += x == INFINITY;
      out[i + l] = isnan ? -INFINITY : x;
    }
  }
  for (; i < n; ++i) {
    const float x = to_f32(in[i]);
    f.nan += x != x;
    f.pinf += x == INFINITY;
    out[i] = x != x ? -INFINITY : x;
  }
  for (int l = 0; l < kLanes; ++l) { f.nan += nan_l[l]; f.pinf += inf_l[l]; }
}

DK_AI float row_max(const float* __restrict x, int64_t n) {
  float m[kLanes];
  for (int l = 0; l < kLanes; ++l) m[l] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) m[l] = x[i + l] > m[l] ? x[i + l] : m[l];
  float r = -INFINITY;
  for (; i < n; ++i) r = x[i] > r ? x[i] : r;
  for (int l = 0; l < kLanes; ++l) r = m[l] > r ? m[l] : r;
  return r;
}

// e[i] = exp((x[i] - m) * inv_t); bs[b] = float sum of block b (kBlock elements).
DK_AI void exp_blocks(const float* __restrict x, float m, float inv_t, float* __restrict e,
                      float* __restrict bs, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    float acc[kLanes] = {0};
    int64_t i = lo;
    for (; i + kLanes <= hi; i += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        const float v = fast_exp((x[i + l] - m) * inv_t);
        e[i + l] = v;
        acc[l] += v;
      }
    float s = 0.f;
    for (; i < hi; ++i) { e[i] = fast_exp((x[i] - m) * inv_t); s += e[i]; }
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    bs[b] = s;
  }
}

DK_AI void block_sums(const float* __restrict e, float* __restrict bs, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
    float acc[kLanes] = {0};
    int64_t i = lo;
    for (; i + kLanes <= hi; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += e[i + l];
    float s = 0.f;
    for (; i < hi; ++i) s += e[i];
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    bs[b] = s;
  }
}

// First index whose cumulative weight (block sums, then elements, in double) exceeds u * total.
DK_AI int64_t inverse_cdf(const float* e, const float* bs, int64_t n, double u, double total) {
  const double target = u * total;
  const int64_t nb = (n + kBlock - 1) / kBlock;
  double cum = 0.0;
  int64_t last = -1;
  for (int64_t b = 0; b < nb; ++b) {
    const double next = cum + static_cast<double>(bs[b]);
    if (bs[b] > 0.f && next > target) {
      double c = cum;
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t i = lo; i < hi; ++i) {
        if (e[i] > 0.f) {
          c += e[i];
          last = i;
          if (c > target) return i;
        }
      }
    } else if (bs[b] > 0.f) {
      const int64_t lo = b * kBlock, hi = std::min(n, lo + kBlock);
      for (int64_t i = hi - 1; i >= lo; --i)
        if (e[i] > 0.f) { last = i; break; }
    }
    cum = next;
  }
  return last < 0 ? 0 : last;  // rounding fell off the end: the last positive token
}

DK_AI double sum_blocks(const float* bs, int64_t n) {
  const int64_t nb = (n + kBlock - 1) / kBlock;
  double s = 0.0;
  for (int64_t b = 0; b < nb; ++b) s += bs[b];
  return s;
}

// ---------------------------------------------------------------------------------------------
// Proposal q = top-p nucleus of softmax(l / T): radix select on the float key, no sort.
// On return e[] holds exp((l - m) / T) on the nucleus and 0 elsewhere, bs[] its block sums, and
// the result is the nucleus mass (sum of e).
// ---------------------------------------------------------------------------------------------

struct Scratch {
  std::vector<float> l, e, bs;
  std::vector<uint32_t> key;
  std::vector<double> hist;
  std::vector<int64_t> cnt;
  void reserve(int64_t V) {
    l.resize(V); e.resize(V); bs.resize((V + kBlock - 1) / kBlock + 1);
    hist.resize(4096); cnt.resize(4096);
  }
};

DK_AI void compute_keys(const float* __restrict l, uint32_t* __restrict key, int64_t n) {
  for (int64_t i = 0; i < n; ++i) key[i] = float_key(l[i]);
}

// Finds the bucket (scanning from the top) where the cumulative mass reaches target; returns
// the bucket and adds the mass strictly above it to `above`.
inline int64_t crossing_bucket(const double* hist, int64_t nb, double target, double& above) {
  int64_t last = -1;
  for (int64_t b = nb - 1; b >= 0; --b) {
    if (hist[b] <= 0.0) continue;
    last = b;
    if (above + hist[b] >= target) return b;
    above += hist[b];
  }
  // rounding: never reached the target; take the lowest non-empty bucket
  above -= last >= 0 ? hist[last] : 0.0;
  return last;
}

DK_AI double build_proposal(const float* l, int64_t V, float m, float inv_t, double top_p, Scratch& s,
                            bool keys_ready) {
  float* e = s.e.data();
  float* bs = s.bs.data();
  exp_blocks(l, m, inv_t, e, bs, V);
  if (top_p >= 1.0) return sum_blocks(bs, V);
  if (!keys_ready) { s.key.resize(V); compute_keys(l, s.key.data(), V); }
  const uint32_t* key = s.key.data();
  double* hist = s.hist.data();
  int64_t* cnt = s.cnt.data();
  // level 1: top 12 bits
  std::fill(hist, hist + 4096, 0.0);
  for (int64_t i = 0; i < V; ++i) hist[key[i] >> 20] += e[i];
  double Z = 0.0;
  for (int b = 0; b < 4096; ++b) Z += hist[b];
  const double target = top_p * Z;
  double above = 0.0;
  const int64_t b1 = crossing_bucket(hist, 4096, target, above);
  // level 2: next 10 bits inside b1
  std::fill(hist, hist + 1024, 0.0);
  for (int64_t i = 0; i < V; ++i)
    if ((key[i] >> 20) == static_cast<uint32_t>(b1)) hist[(key[i] >> 10) & 1023] += e[i];
  const int64_t b2 = crossing_bucket(hist, 1024, target, above);
  const uint32_t pre = (static_cast<uint32_t>(b1) << 10) | static_cast<uint32_t>(b2);
  // level 3: last 10 bits
  std::fill(hist, hist + 1024, 0.0);
  std::fill(cnt, cnt + 1024, 0);
  float e_t = 0.f;
  for (int64_t i = 0; i < V; ++i)
    if ((key[i] >> 10) == pre) { hist[key[i] & 1023] += e[i]; cnt[key[i] & 1023] += 1; }
  const int64_t b3 = crossing_bucket(hist, 1024, target, above);
  const uint32_t tkey = (pre << 10) | static_cast<uint32_t>(b3);
  const int64_t ties = cnt[b3];
  for (int64_t i = 0; i < V; ++i)
    if (key[i] == tkey) { e_t = e[i]; break; }
  int64_t need = static_cast<int64_t>(std::ceil((target - above) / static_cast<double>(e_t)));
  need = std::max<int64_t>(1, std::min(need, ties));
  // keep keys > tkey, and the first `need` (lowest ids) of the ties
  for (int64_t i = 0; i < V; ++i) e[i] = key[i] >= tkey ? e[i] : 0.f;
  if (need < ties) {
    int64_t seen = 0;
    for (int64_t i = 0; i < V; ++i)
      if (key[i] == tkey) { if (seen >= need) e[i] = 0.f; ++seen; }
  }
  block_sums(e, bs, V);
  return sum_blocks(bs, V);
}

// ---------------------------------------------------------------------------------------------
// poe_draft
// ---------------------------------------------------------------------------------------------

template <typename T>
struct DraftArgs {
  const T* logits; int64_t sB, sW;
  const float* temps; const double* u;
  int64_t B, K, W, V;
  double top_p;
  int64_t* tokens; float* log_q;
  Flags* flags;   // per (b, j)
};

template <typename T>
DK_AI void draft_rows_impl(const DraftArgs<T>& a, int64_t begin, int64_t end) {
  Scratch s;
  s.reserve(a.V);
  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / a.W, j = r % a.W;
    Flags f;
    load_row(a.logits + b * a.sB + j * a.sW, s.l.data(), a.V, f);
    const float m = row_max(s.l.data(), a.V);
    f.empty = m == -INFINITY;
    a.flags[r] = f;
    if (f.empty) continue;  // reported by the caller
    bool keys_ready = false;
    if (a.top_p < 1.0) { s.key.resize(a.V); compute_keys(s.l.data(), s.key.data(), a.V); keys_ready = true; }
    for (int64_t k = 0; k < a.K; ++k) {
      const float inv_t = 1.0f / a.temps[b * a.K + k];
      const double mass = build_proposal(s.l.data(), a.V, m, inv_t, a.top_p, s, keys_ready);
      const int64_t o = (b * a.K + k) * a.W + j;
      const int64_t x = inverse_cdf(s.e.data(), s.bs.data(), a.V, a.u[o], mass);
      a.tokens[o] = x;
      a.log_q[o] = static_cast<float>(std::log(static_cast<double>(s.e[x])) - std::log(mass));
    }
  }
}

DK_ISA_CLONES(template <typename T>, draft_rows, (const DraftArgs<T>& a, int64_t begin, int64_t end), <T>,
              (a, begin, end))

// Row i of an [E, kStatusPerLogits] status (poe.h's LogitStatus) += one row's flags.
void count(const Flags& f, at::Tensor& status, int64_t i) {
  int64_t* s = status.data_ptr<int64_t>() + i * poe::kStatusPerLogits;
  s[poe::kNanCount] += f.nan;
  s[poe::kPosInfCount] += f.pinf;
  s[poe::kEmptyRows] += f.empty;
}

// The status is an error the Python side raises (so nothing downstream of it may run).
bool is_error(const at::Tensor& status, bool allow_nan) {
  const int64_t* s = status.data_ptr<int64_t>();
  for (int64_t i = 0; i < status.size(0); ++i, s += poe::kStatusPerLogits)
    if (s[poe::kPosInfCount] || s[poe::kEmptyRows] || (!allow_nan && s[poe::kNanCount])) return true;
  return false;
}

at::Tensor new_status(int64_t logits_inputs) {
  return at::zeros({logits_inputs, poe::kStatusPerLogits}, at::TensorOptions().dtype(at::kLong));
}

// Returns (tokens, log_q, status [1, 3] of dlm_logits); rows that are entirely -inf are left unset.
std::tuple<at::Tensor, at::Tensor, at::Tensor> poe_draft_kernel(const at::Tensor& logits, const at::Tensor& temps,
                                                                double top_p, const at::Tensor& uniforms) {
  TORCH_CHECK(logits.dim() == 3 && logits.stride(2) == 1, "dlm_logits: expected [B, W, V] with unit stride in V");
  TORCH_CHECK(temps.scalar_type() == at::kFloat && temps.is_contiguous(), "temperatures: float32 contiguous");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous(), "uniforms: float64 contiguous");
  const int64_t B = logits.size(0), W = logits.size(1), V = logits.size(2), K = temps.size(1);
  auto tokens = at::empty({B, K, W}, logits.options().dtype(at::kLong));
  auto log_q = at::empty({B, K, W}, logits.options().dtype(at::kFloat));
  std::vector<Flags> flags(B * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "poe_draft_kernel", [&] {
    DraftArgs<scalar_t> a{logits.data_ptr<scalar_t>(), logits.stride(0), logits.stride(1),
                          temps.data_ptr<float>(), uniforms.data_ptr<double>(), B, K, W, V, top_p,
                          tokens.data_ptr<int64_t>(), log_q.data_ptr<float>(), flags.data()};
    at::parallel_for(0, B * W, 1, [&](int64_t begin, int64_t end) { draft_rows(a, begin, end); });
  });
  auto status = new_status(1);  // dlm_logits
  for (const Flags& f : flags) count(f, status, 0);
  return {tokens, log_q, status};
}

// ---------------------------------------------------------------------------------------------
// poe_verify
// ---------------------------------------------------------------------------------------------

struct RowStats {
  MaxSum d, p, a;     // online stats of l_D/T, (w l_D + (1-w) l_AR)/T, l_AR/T*
  double log_q_x, log_p_x, log_a_x, ld_x, la_x;
  double nucleus_mass;  // top_p < 1 and not parity: mass of the nucleus (e relative to max l_D)
  float max_d;          // raw max of l_D (for the nucleus e = exp((l - max) / T))
  Flags fd, fa;
};

template <typename T>
struct VerifyArgs {
  const T* dlm; int64_t dB, dK, dW;
  const T* ar; int64_t aB, aK, aW;
  const int64_t* drafts;
  const float* temps;
  int64_t B, K, W, V;
  float w; double top_p; float t_star; bool parity;
  RowStats* stats;
};

template <typename T>
DK_AI float load1(const T* p) {
  const float x = to_f32(*p);
  return x != x ? -INFINITY : x;
}

// One streaming pass over L1-sized chunks: three online softmax denominators + gathers.
template <typename T>
DK_AI void verify_rows_impl(const VerifyArgs<T>& a, int64_t begin, int64_t end) {
  float d[kChunk], r[kChunk];
  Scratch s;
  const bool nucleus = a.top_p < 1.0 && !a.parity;
  if (nucleus) s.reserve(a.V);
  const float cd = a.w, ca = 1.0f - a.w;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / (a.K * a.W), k = (row / a.W) % a.K, j = row % a.W;
    const T* pd = a.dlm + b * a.dB + k * a.dK + j * a.dW;
    const T* pa = a.ar + b * a.aB + k * a.aK + j * a.aW;
    const float T_k = a.temps[b * a.K + k];
    const float inv_t = 1.0f / T_k, inv_ts = 1.0f / (a.t_star > 0 ? a.t_star : T_k);
    RowStats st;
    float raw_max_d = -INFINITY;
    for (int64_t c0 = 0; c0 < a.V; c0 += kChunk) {
      const int64_t n = std::min(kChunk, a.V - c0);
      load_row(pd + c0, d, n, st.fd);
      load_row(pa + c0, r, n, st.fa);
      if (nucleus) std::copy(d, d + n, s.l.data() + c0);
      float md[kLanes], mp[kLanes], ma[kLanes];
      for (int l = 0; l < kLanes; ++l) md[l] = mp[l] = ma[l] = -INFINITY;
      int64_t i = 0;
      const int64_t nv = n - n % kLanes;
      for (; i < nv; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const float x = d[i + l], y = r[i + l];
          const float p = ((cd == 0.f ? 0.f : cd * x) + (ca == 0.f ? 0.f : ca * y));
          md[l] = x > md[l] ? x : md[l];
          mp[l] = p > mp[l] ? p : mp[l];
          ma[l] = y > ma[l] ? y : ma[l];
        }
      float Md = -INFINITY, Mp = -INFINITY, Ma = -INFINITY;
      for (; i < n; ++i) {
        const float x = d[i], y = r[i];
        const float p = ((cd == 0.f ? 0.f : cd * x) + (ca == 0.f ? 0.f : ca * y));
        Md = std::max(Md, x); Mp = std::max(Mp, p); Ma = std::max(Ma, y);
      }
      for (int l = 0; l < kLanes; ++l) { Md = std::max(Md, md[l]); Mp = std::max(Mp, mp[l]); Ma = std::max(Ma, ma[l]); }
      raw_max_d = std::max(raw_max_d, Md);
      // sums of exp relative to the chunk maxima (in tempered space)
      const float Md_s = Md * inv_t, Mp_s = Mp * inv_t, Ma_s = Ma * inv_ts;
      float sd[kLanes] = {0}, sp[kLanes] = {0}, sa[kLanes] = {0};
      i = 0;
      for (; i < nv; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const float x = d[i + l], y = r[i + l];
          const float p = ((cd == 0.f ? 0.f : cd * x) + (ca == 0.f ? 0.f : ca * y));
          sd[l] += fast_exp(x * inv_t - Md_s);
          sp[l] += fast_exp(p * inv_t - Mp_s);
          sa[l] += fast_exp(y * inv_ts - Ma_s);
        }
      float Sd = 0.f, Sp = 0.f, Sa = 0.f;
      for (; i < n; ++i) {
        const float x = d[i], y = r[i];
        const float p = ((cd == 0.f ? 0.f : cd * x) + (ca == 0.f ? 0.f : ca * y));
        Sd += fast_exp(x * inv_t - Md_s); Sp += fast_exp(p * inv_t - Mp_s); Sa += fast_exp(y * inv_ts - Ma_s);
      }
      for (int l = 0; l < kLanes; ++l) { Sd += sd[l]; Sp += sp[l]; Sa += sa[l]; }
      if (Md > -INFINITY) poe::merge(st.d, Md_s, Sd);
      if (Mp > -INFINITY) poe::merge(st.p, Mp_s, Sp);
      if (Ma > -INFINITY) poe::merge(st.a, Ma_s, Sa);
    }
    st.max_d = raw_max_d;
    const int64_t x = a.drafts[row];
    const float lx = load1(pd + x), ly = load1(pa + x);
    const float px = (cd == 0.f ? 0.f : cd * lx) + (ca == 0.f ? 0.f : ca * ly);
    st.ld_x = lx;
    st.la_x = ly;
    st.log_p_x = static_cast<double>(px * inv_t) - poe::log_sum_exp(st.p);
    st.log_a_x = static_cast<double>(ly * inv_ts) - poe::log_sum_exp(st.a);
    if (nucleus && raw_max_d > -INFINITY) {
      st.nucleus_mass = build_proposal(s.l.data(), a.V, raw_max_d, inv_t, a.top_p, s, false);
      st.log_q_x = s.e[x] > 0.f ? std::log(static_cast<double>(s.e[x])) - std::log(st.nucleus_mass) : -INFINITY;
    } else {
      st.nucleus_mass = 0.0;
      st.log_q_x = lx > -INFINITY ? static_cast<double>(lx * inv_t) - poe::log_sum_exp(st.d) : -INFINITY;
    }
    a.stats[row] = st;
  }
}

DK_ISA_CLONES(template <typename T>, verify_rows, (const VerifyArgs<T>& a, int64_t begin, int64_t end), <T>,
              (a, begin, end))

// Residual sample of row (b, k, j): inverse CDF of (p - q)_+ (p if that is zero), token-id order.
template <typename T>
DK_AI void residual_rows_impl(const VerifyArgs<T>& a, const int64_t* jrow, const double* u, int64_t* out,
                              double* term, int64_t begin, int64_t end) {
  Scratch s;
  s.reserve(a.V);
  std::vector<float> rbuf(a.V);
  const bool nucleus = a.top_p < 1.0 && !a.parity;
  const float cd = a.w, ca = 1.0f - a.w;
  for (int64_t bk = begin; bk < end; ++bk) {
    const int64_t j = jrow[bk];
    if (j < 0) continue;
    const int64_t b = bk / a.K, k = bk % a.K, row = bk * a.W + j;
    const RowStats& st = a.stats[row];
    const T* pd = a.dlm + b * a.dB + k * a.dK + j * a.dW;
    const T* pa = a.ar + b * a.aB + k * a.aK + j * a.aW;
    const float inv_t = 1.0f / a.temps[b * a.K + k];
    Flags f;
    load_row(pd, s.l.data(), a.V, f);
    float* d = s.l.data();
    float* r = rbuf.data();
    load_row(pa, r, a.V, f);
    // q(v): the nucleus e / mass (built exactly as in the verify pass), or softmax(l_D / T)
    float q_scale;
    if (nucleus) {
      const double mass = build_proposal(d, a.V, st.max_d, inv_t, a.top_p, s, false);
      q_scale = static_cast<float>(1.0 / mass);
    } else {
      const float lse = poe::log_sum_exp(st.d);
      float* e = s.e.data();
      for (int64_t i = 0; i < a.V; ++i) e[i] = fast_exp(d[i] * inv_t - lse);
      q_scale = 1.0f;
    }
    const float lse_p = poe::log_sum_exp(st.p);
    const float* e = s.e.data();
    for (int64_t i = 0; i < a.V; ++i) {
      const float pl = (cd == 0.f ? 0.f : cd * d[i]) + (ca == 0.f ? 0.f : ca * r[i]);
      const float p = fast_exp(pl * inv_t - lse_p);
      const float diff = p - e[i] * q_scale;
      r[i] = diff > 0.f ? diff : 0.f;
      d[i] = p;  // keep p for the fallback
    }
    float* bs = s.bs.data();
    block_sums(r, bs, a.V);
    double total = sum_blocks(bs, a.V);
    const float* w = r;
    if (!(total > 0.0)) {
      block_sums(d, bs, a.V);
      total = sum_blocks(bs, a.V);
      w = d;
    }
    const int64_t y = inverse_cdf(w, bs, a.V, u[bk * (a.W + 1) + a.W], total);
    out[bk] = y;
    // the emitted token's term: raw logit difference (parity) or log a(y) - log p(y)
    const float lx = load1(pd + y), ly = load1(pa + y);
    if (a.parity) {
      term[bk] = static_cast<double>(ly) - lx;
    } else {
      const float inv_ts = 1.0f / (a.t_star > 0 ? a.t_star : a.temps[b * a.K + k]);
      const float pl = (cd == 0.f ? 0.f : cd * lx) + (ca == 0.f ? 0.f : ca * ly);
      term[bk] = (static_cast<double>(ly * inv_ts) - poe::log_sum_exp(st.a)) -
                 (static_cast<double>(pl * inv_t) - poe::log_sum_exp(st.p));
    }
  }
}

DK_ISA_CLONES(template <typename T>, residual_rows,
              (const VerifyArgs<T>& a, const int64_t* jrow, const double* u, int64_t* out, double* term,
               int64_t begin, int64_t end),
              <T>, (a, jrow, u, out, term, begin, end))

// Returns (num_accepted [B, K], residual token [B, K] (-1: none), importance (or parity "energy")
// term of the accepted prefix [B, K] float64, term of the residual token [B, K] float64, status
// [3, 3] of (dlm_logits, ar_logits, the PoE logits)); pyglue/ops/poe.py finishes (corrected
// tokens, parity mean, incoming weights) the same way for every fast backend.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> poe_verify_kernel(
    const at::Tensor& dlm, const at::Tensor& ar, const at::Tensor& drafts, const at::Tensor& temps,
    double weight, double top_p, double target_temperature, const at::Tensor& uniforms, bool parity,
    bool allow_nan) {
  TORCH_CHECK(dlm.dim() == 4 && ar.dim() == 4 && dlm.stride(3) == 1 && ar.stride(3) == 1,
              "dlm_logits/ar_logits: expected [B, K, W, V] with unit stride in V");
  TORCH_CHECK(dlm.scalar_type() == ar.scalar_type(), "dlm_logits/ar_logits: dtypes differ");
  TORCH_CHECK(drafts.scalar_type() == at::kLong && drafts.is_contiguous(), "draft_tokens: int64 contiguous");
  TORCH_CHECK(temps.scalar_type() == at::kFloat && temps.is_contiguous(), "temperatures: float32 contiguous");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.is_contiguous(), "uniforms: float64 contiguous");
  const int64_t B = ar.size(0), K = ar.size(1), W = ar.size(2), V = ar.size(3);
  std::vector<RowStats> stats(B * K * W);
  auto opts = ar.options();
  auto num_acc = at::empty({B, K}, opts.dtype(at::kLong));
  auto resid = at::full({B, K}, -1, opts.dtype(at::kLong));
  auto prefix_term = at::zeros({B, K}, opts.dtype(at::kDouble));
  auto resid_term = at::zeros({B, K}, opts.dtype(at::kDouble));
  auto status = new_status(3);  // dlm_logits, ar_logits, the PoE logits
  const double* u = uniforms.data_ptr<double>();
  int64_t* n_acc = num_acc.data_ptr<int64_t>();
  double* prefix = prefix_term.data_ptr<double>();
  std::vector<int64_t> jrow(B * K, -1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, ar.scalar_type(), "poe_verify_kernel", [&] {
    VerifyArgs<scalar_t> a{dlm.data_ptr<scalar_t>(), dlm.stride(0), dlm.stride(1), dlm.stride(2),
                           ar.data_ptr<scalar_t>(), ar.stride(0), ar.stride(1), ar.stride(2),
                           drafts.data_ptr<int64_t>(), temps.data_ptr<float>(), B, K, W, V,
                           static_cast<float>(weight), top_p, static_cast<float>(target_temperature), parity,
                           stats.data()};
    at::parallel_for(0, B * K * W, 1, [&](int64_t begin, int64_t end) { verify_rows(a, begin, end); });
    for (const auto& st : stats) {
      count({st.fd.nan, st.fd.pinf, st.d.m == -INFINITY}, status, 0);
      count({st.fa.nan, st.fa.pinf, st.a.m == -INFINITY}, status, 1);
      count({0, 0, st.p.m == -INFINITY}, status, 2);
    }
    if (is_error(status, allow_nan)) return;  // Python raises; the rows are not valid input below
    // acceptance scan (sequential over j per particle) and the accepted prefix's term
    for (int64_t bk = 0; bk < B * K; ++bk) {
      int64_t n = W;
      for (int64_t j = 0; j < W; ++j) {
        const RowStats& st = stats[bk * W + j];
        if (!poe::accept_log(u[bk * (W + 1) + j], st.log_p_x, st.log_q_x)) { n = j; break; }
      }
      n_acc[bk] = n;
      if (n < W) jrow[bk] = n;
      for (int64_t j = 0; j < n; ++j) {
        const RowStats& st = stats[bk * W + j];
        prefix[bk] += parity ? (st.la_x - st.ld_x) : (st.log_a_x - st.log_p_x);
      }
    }
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      residual_rows(a, jrow.data(), u, resid.data_ptr<int64_t>(), resid_term.data_ptr<double>(), begin, end);
    });
  });
  return {num_acc, resid, prefix_term, resid_term, status};
}

// ---------------------------------------------------------------------------------------------
// product_of_experts: log_softmax(sum_i w_i l_i / T), fp32 out
// ---------------------------------------------------------------------------------------------

template <typename T>
struct CombineArgs {
  std::vector<const T*> ptr;
  std::vector<float> w;
  std::vector<int64_t> row_stride;  // stride between rows (all dims but the last flattened)
  int64_t V;
  float inv_t;
  float* out;
};

template <typename T>
DK_AI void combine_rows_impl(const CombineArgs<T>& a, int64_t begin, int64_t end) {
  std::vector<float> buf(a.V);
  Flags f;
  for (int64_t r = begin; r < end; ++r) {
    float* o = a.out + r * a.V;
    std::fill(o, o + a.V, 0.f);
    for (size_t e = 0; e < a.ptr.size(); ++e) {
      if (a.w[e] == 0.f) continue;  // 0 * (-inf) = 0: no say
      load_row(a.ptr[e] + r * a.row_stride[e], buf.data(), a.V, f);
      const float w = a.w[e] * a.inv_t;
      for (int64_t i = 0; i < a.V; ++i) {  // -inf in any expert with a say masks the token
        const bool masked = o[i] == -INFINITY || buf[i] == -INFINITY;
        o[i] = masked ? -INFINITY : o[i] + w * buf[i];
      }
    }
    const float m = row_max(o, a.V);
    float acc[kLanes] = {0};
    int64_t i = 0;
    for (; i + kLanes <= a.V; i += kLanes)
      for (int l = 0; l < kLanes; ++l) acc[l] += fast_exp(o[i + l] - m);
    float s = 0.f;
    for (; i < a.V; ++i) s += fast_exp(o[i] - m);
    for (int l = 0; l < kLanes; ++l) s += acc[l];
    const float lse = m + std::log(s);
    for (i = 0; i < a.V; ++i) o[i] -= lse;
  }
}

DK_ISA_CLONES(template <typename T>, combine_rows, (const CombineArgs<T>& a, int64_t begin, int64_t end), <T>,
              (a, begin, end))

at::Tensor product_of_experts_kernel(at::TensorList logits, c10::ArrayRef<double> weights, double temperature) {
  TORCH_CHECK(!logits.empty() && logits.size() == weights.size(), "logits/weights: one weight per expert");
  const auto& first = logits[0];
  const int64_t V = first.size(-1), rows = first.numel() / std::max<int64_t>(V, 1);
  auto out = at::empty(first.sizes(), first.options().dtype(at::kFloat));
  std::vector<at::Tensor> flat;
  for (const auto& t : logits) {
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), "logits: all experts must share one dtype");
    flat.push_back(t.reshape({rows, V}));
    TORCH_CHECK(flat.back().stride(1) == 1, "logits: unit stride in V expected");
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, first.scalar_type(), "product_of_experts_kernel", [&] {
    CombineArgs<scalar_t> a;
    for (size_t e = 0; e < flat.size(); ++e) {
      a.ptr.push_back(flat[e].data_ptr<scalar_t>());
      a.w.push_back(static_cast<float>(weights[e]));
      a.row_stride.push_back(flat[e].stride(0));
    }
    a.V = V;
    a.inv_t = static_cast<float>(1.0 / temperature);
    a.out = out.data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) { combine_rows(a, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(diffkern, m) {
  m.def("poe_draft_kernel(Tensor logits, Tensor temps, float top_p, Tensor uniforms) -> (Tensor, Tensor, Tensor)");
  m.def("poe_verify_kernel(Tensor dlm, Tensor ar, Tensor drafts, Tensor temps, float weight, float top_p, "
        "float target_temperature, Tensor uniforms, bool parity, bool allow_nan) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("product_of_experts_kernel(Tensor[] logits, float[] weights, float temperature) -> Tensor");
}

TORCH_LIBRARY_IMPL(diffkern, CPU, m) {
  m.impl("poe_draft_kernel", &poe_draft_kernel);
  m.impl("poe_verify_kernel", &poe_verify_kernel);
  m.impl("product_of_experts_kernel", &product_of_experts_kernel);
}

}  // namespace diffkern
