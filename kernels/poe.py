"""Triton kernels of the PoE operator family (``diffkern.ops.poe``; the float64 reference there is
the spec, ``csrc/cpu/poe.cpp`` the CPU fast path whose conventions these kernels follow).

Kernels (every one works on 2-D tiles ``[BLOCK_R rows, BLOCK_V vocabulary]``: on a GPU
``BLOCK_R = 1`` and ``BLOCK_V`` <= 2048; under ``TRITON_INTERPRET=1`` large tiles, because the
interpreter's cost is per program-iteration, not per element):

* ``_verify_rows_kernel``  one streaming pass per (b, k, j) row over l_D (stride-0 in K allowed: the
  shared ``[B, W, V]`` DLM logits are read through their strides, never copied) and l_AR: online
  (max, sum-exp) of l_D/T, the PoE logits (w l_D + (1-w) l_AR)/T (``0 * (-inf) = 0``) and l_AR/T*,
  gathers at the drafted token, NaN / +inf counters. NUCLEUS (top_p < 1, not parity): then the
  nucleus select on l_D (below) for log q(x), and the row's nucleus descriptor (threshold key, last
  kept tie, max l_D, nucleus mass) for the residual kernel.
* ``_verify_scan_kernel``   per (b, k): acceptance ``log u_j < log p(x_j) - log q(x_j)`` over the
  window, first rejected index, importance (or parity "energy") term of the accepted prefix.
* ``_verify_residual_kernel`` per (b, k), only rows with a rejection do any loads: inverse CDF in
  token-id order (float64 accumulation) of ``(p - q)_+`` (``p`` when that is zero) with the
  residual uniform, and the emitted token's log-weight term; NUCLEUS: q from the descriptor.
* ``_draft_kernel``         per (b, k, j): proposal ``softmax(l_D / T)`` (NUCLEUS: its top-p nucleus,
  selected below), inverse CDF in token-id order (float64 accumulation) with the given uniform.
* ``_combine_kernel``       product_of_experts: log_softmax(sum_e w_e l_e / T), up to 4 experts per
  launch (more are folded in groups through a float32 partial sum), -inf masking rule.

Top-p nucleus (``_nucleus``, the cpu's ``build_proposal`` without its scatter histograms): the
masses are ``e = exp((l - max l) / T)`` (float32, one expression everywhere so draft, verify and
residual agree bitwise), sums in float64. The threshold token is found by a radix select on the
monotone uint32 key of the raw logit (the order of l/T is that of l): 8 passes over the row, each
a weighted histogram of the next 4-bit digit among the tokens matching the prefix so far (tl.histogram
takes no weights: a one-hot ``[BLOCK_R, BLOCK_S, 16]`` compare + sum), scanning digits from the top
for where the mass-at-or-above reaches ``top_p * Z`` (Z from pass 1's histogram). Equal logits
share a key: of the ties at the threshold key, ``ceil((top_p Z - mass above) / e_t)`` are kept,
the lowest ids, which a last pass (only when a tie is actually cut) turns into a token-id cut. The
nucleus is then ``key > tkey or (key == tkey and id <= cut)``: no sort, no per-token state.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["poe_draft", "poe_verify", "product_of_experts"]

# Columns of the per-row statistics buffer of the verify pass (float32 [R, _NSTATS]): log q(x),
# log p(x), log a(x), l_D(x), l_AR(x), and the log-sum-exps of the proposal, the PoE and the AR target.
_S_LQ, _S_LP, _S_LA, _S_LD, _S_LR, _S_LSE_D, _S_LSE_P, _S_LSE_A = (tl.constexpr(i) for i in range(8))
_NSTATS = tl.constexpr(8)
# Per-row flags of each logits input, laid out as diffkern.ops.poe's status (poe.h LogitStatus):
# [rows, inputs, _NFLAGS] counts of (NaN, +inf, entirely -inf), summed over the rows by the launchers.
_F_NAN, _F_PINF, _F_EMPTY = (tl.constexpr(i) for i in range(3))
_NFLAGS = tl.constexpr(3)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _online(m, s, x):
    """Merge a [R, C] chunk x into running per-row (max, sum exp(x - max)); -inf safe."""
    new_m = tl.maximum(m, tl.max(x, axis=1))
    ms = tl.where(new_m == float("-inf"), 0.0, new_m)
    s = s * tl.exp(m - ms) + tl.sum(tl.exp(x - ms[:, None]), axis=1)
    return new_m, s


@triton.jit
def _clean(x):
    """float32, NaN -> -inf (masked token)."""
    x = x.to(tl.float32)
    return tl.where(x != x, float("-inf"), x)


@triton.jit
def _not_finite(x):
    """1 where x is +-inf or NaN (a log-sum-exp of a row with no finite logit), else 0 (int32)."""
    return ((x != x) | (tl.abs(x) == float("inf"))).to(tl.int32)


@triton.jit
def _weighted(w, x):
    """w * x with 0 * (-inf) = 0."""
    return tl.where(w == 0.0, 0.0, w * x)


# ---------------------------------------------------------------------------------------------
# Top-p nucleus: radix select of the threshold token on the logit's float key (no sort)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _float_key(x):
    """Monotone uint32 key of a float32 (a < b <=> key(a) < key(b); poe.h's float_key): the order
    of l equals the order of l / T for T > 0, so the select runs on the raw logits. -0.0 is keyed
    as +0.0: equal logits must tie (and go to the lower id), as in the reference."""
    b = (x + 0.0).to(tl.uint32, bitcast=True)      # -0.0 + 0.0 = +0.0
    return tl.where((b & 0x80000000) != 0, ~b, b | 0x80000000)


@triton.jit
def _key_to_float(k):
    """Inverse of _float_key."""
    b = tl.where((k & 0x80000000) != 0, k & 0x7FFFFFFF, ~k)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _nucleus_mass(x, m, inv_t):
    """exp((l - max l) / T): the unnormalised tempered probability the nucleus is cut on. One
    expression everywhere (select, draft, verify, residual), so every pass sees bitwise the same
    masses, and tokens with equal logits equal masses."""
    return tl.exp((x - m) * inv_t)


@triton.jit
def _load_row_block(row_ptr, cols, live, V):
    """[R, C] float32 logits (NaN -> -inf, -inf beyond V) of the rows at ``row_ptr`` [R]."""
    m2 = live[:, None] & (cols < V)[None, :]
    return _clean(tl.load(row_ptr[:, None] + cols[None, :], mask=m2, other=float("-inf"))), m2


@triton.jit
def _digit_mass(row_ptr, live, V, m, inv_t, prefix, shift,
                BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """[R, 16] float64 mass of the tokens whose key has ``prefix`` above bit ``shift + 4``, by
    the 4-bit digit at ``shift``. tl.histogram takes no weights: the one-hot [R, C, 16] compare
    and reduction is the weighted histogram."""
    digits = tl.arange(0, 16)
    h = tl.zeros([BLOCK_R, 16], tl.float64)
    for start in range(0, V, BLOCK_S):
        x, m2 = _load_row_block(row_ptr, start + tl.arange(0, BLOCK_S), live, V)
        top = _float_key(x) >> shift
        e = _nucleus_mass(x, m[:, None], inv_t[:, None])
        # float64 like the cpu's histograms: with float32 block sums about 1 row in 250 at V = 32000
        # (top_p 0.9-0.95) moves its boundary token against the float64 reference
        e = tl.where((top >> 4) == prefix[:, None], e, 0.0).to(tl.float64)
        onehot = (top & 15)[:, :, None] == digits[None, None, :]
        h += tl.sum(tl.where(onehot, e[:, :, None], 0.0), axis=1)
    return h


@triton.jit
def _pick_digit(h, above, target):
    """The cpu's crossing_bucket on one level: scanning the digits from the top, the first with
    mass whose mass-at-or-above (plus ``above``, the mass of higher prefixes) reaches ``target``;
    if rounding leaves ``target`` beyond the total, the lowest digit with mass.
    Returns (digit, the new mass strictly above it, its mass)."""
    digits = tl.arange(0, 16)[None, :]
    at_or_above = above[:, None] + tl.cumsum(h, axis=1, reverse=True)
    full = h > 0.0
    d = tl.max(tl.where(full & (at_or_above >= target[:, None]), digits, -1), axis=1)
    d = tl.where(d >= 0, d, tl.min(tl.where(full, digits, 15), axis=1))
    sel = digits == d[:, None]
    h_d = tl.sum(tl.where(sel, h, 0.0), axis=1)
    return d, tl.sum(tl.where(sel, at_or_above, 0.0), axis=1) - h_d, h_d


@triton.jit
def _tie_cut(row_ptr, live, V, tkey, keep, ties, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Largest token id kept among the ties at the threshold key: the ``keep``-th one in id order
    (ties go to the lower ids), INT_MAX when all are kept. Reads a row only when a tie is really
    cut (several exactly equal logits at the threshold), so it costs nothing otherwise."""
    cut = tl.full([BLOCK_R], 2147483647, tl.int32)
    partial = live & (keep < ties)
    seen = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, tl.max(tl.where(partial, V, 0), axis=0), BLOCK_S):
        cols = start + tl.arange(0, BLOCK_S)
        x, m2 = _load_row_block(row_ptr, cols, partial, V)
        tie = ((_float_key(x) == tkey[:, None]) & m2).to(tl.int32)
        rank = seen[:, None] + tl.cumsum(tie, axis=1)
        hit = (tie > 0) & (rank == keep[:, None])
        cut = tl.minimum(cut, tl.min(tl.where(hit, cols[None, :], 2147483647), axis=1))
        seen += tl.sum(tie, axis=1)
    return cut


@triton.jit
def _nucleus(row_ptr, live, V, m, inv_t, top_p, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """Top-p nucleus of softmax(l / T) for the rows at ``row_ptr`` (``m`` = max l, finite):
    the tokens of key > ``tkey``, and those of key == ``tkey`` with id <= ``cut``.
    Radix select from the top, 4 bits per pass (8 passes), of the key of the threshold token
    (the one whose mass-at-or-above first reaches top_p * Z), then the number of its ties kept:
    ceil((top_p Z - mass above) / e_t), at least 1 (the cpu's build_proposal, digit by digit).
    Masses are float32, their sums float64. Returns (tkey, cut, nucleus mass, float64)."""
    prefix = tl.zeros([BLOCK_R], tl.uint32)
    above = tl.zeros([BLOCK_R], tl.float64)
    target = tl.zeros([BLOCK_R], tl.float64)
    h_t = tl.zeros([BLOCK_R], tl.float64)
    for level in range(8):
        h = _digit_mass(row_ptr, live, V, m, inv_t, prefix, 28 - 4 * level, BLOCK_R, BLOCK_S)
        target = tl.where(level == 0, top_p * tl.sum(h, axis=1), target)   # level 0 sees every token
        d, above, h_t = _pick_digit(h, above, target)
        prefix = (prefix << 4) | d.to(tl.uint32)
    e_t = _nucleus_mass(_key_to_float(prefix), m, inv_t).to(tl.float64)
    e_t = tl.where(live & (e_t > 0.0), e_t, 1.0)
    ties = (h_t / e_t + 0.5).to(tl.int32)          # h_t sums `ties` copies of e_t: exact in float64
    need = tl.maximum(tl.ceil((target - above) / e_t), 1.0).to(tl.int32)
    keep = tl.minimum(need, ties)
    cut = _tie_cut(row_ptr, live, V, prefix, keep, ties, BLOCK_R, BLOCK_S)
    return prefix, cut, above + keep.to(tl.float64) * e_t


@triton.jit
def _in_nucleus(x, col, tkey, cut):
    """Membership of token ``col`` (logit x) in the nucleus (tkey, cut) of _nucleus."""
    key = _float_key(x)
    return (key > tkey) | ((key == tkey) & (col <= cut))


@triton.jit
def _proposal(x, cols, inv_t, offset, scale, tkey, cut, NUCLEUS: tl.constexpr):
    """One [R, C] block of the proposal q up to normalisation, per-row arguments [R]: top_p = 1:
    exp(l / T - offset); NUCLEUS: the nucleus masses exp((l - offset) / T) * scale (offset = max l),
    0 outside the nucleus (tkey, cut from _nucleus)."""
    if NUCLEUS:
        e = _nucleus_mass(x, offset[:, None], inv_t[:, None]) * scale[:, None]
        return tl.where(_in_nucleus(x, cols[None, :], tkey[:, None], cut[:, None]), e, 0.0)
    else:
        return tl.exp(x * inv_t[:, None] - offset[:, None])


# ---------------------------------------------------------------------------------------------
# poe_verify
# ---------------------------------------------------------------------------------------------

@triton.jit
def _inverse_cdf_block(v, cols, cum, target, tok, last):
    """One vocabulary block of inverse-CDF sampling in token-id order over the (unnormalised,
    fp64) masses ``v`` [R, BLOCK]: the first column whose running sum passes ``target`` becomes
    ``tok`` (if none was found yet); ``last`` tracks the last column with mass (the fallback when
    rounding leaves ``target`` beyond the total). Returns the updated (tok, last, cum)."""
    cs = cum[:, None] + tl.cumsum(v, axis=1)
    hit = (cs > target[:, None]) & (v > 0.0)
    first = tl.min(tl.where(hit, cols[None, :], 2147483647), axis=1)
    tok = tl.where((tok < 0) & (first < 2147483647), first, tok)
    last = tl.maximum(last, tl.max(tl.where(v > 0.0, cols[None, :], -1), axis=1))
    return tok, last, cum + tl.sum(v, axis=1)


@triton.jit
def _verify_rows_kernel(dlm_ptr, ar_ptr, drafts_ptr, temps_ptr, stats_ptr, flags_ptr, nkey_ptr, nval_ptr,
                        R, K, W, V, dB, dK, dW, aB, aK, aW, w, inv_t_star, top_p: tl.float64,
                        NUCLEUS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                        BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    b = rows_c // (K * W)
    k = (rows_c // W) % K
    j = rows_c % W
    base_d = b * dB + k * dK + j * dW
    base_a = b * aB + k * aK + j * aW
    T = tl.load(temps_ptr + b * K + k, mask=rmask, other=1.0)
    inv_t = 1.0 / T
    inv_ts = tl.where(inv_t_star > 0, inv_t_star + 0.0 * inv_t, inv_t)
    cd = w
    ca = 1.0 - w

    m_d = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m_p = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m_a = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s_d = tl.zeros([BLOCK_R], tl.float32)
    s_p = tl.zeros([BLOCK_R], tl.float32)
    s_a = tl.zeros([BLOCK_R], tl.float32)
    m_raw = tl.full([BLOCK_R], float("-inf"), tl.float32)   # max l_D (the nucleus masses' reference)
    nan_d = tl.zeros([BLOCK_R], tl.int32)
    nan_a = tl.zeros([BLOCK_R], tl.int32)
    inf_d = tl.zeros([BLOCK_R], tl.int32)
    inf_a = tl.zeros([BLOCK_R], tl.int32)
    cols0 = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        m2 = rmask[:, None] & (cols < V)[None, :]
        xr = tl.load(dlm_ptr + base_d[:, None] + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        yr = tl.load(ar_ptr + base_a[:, None] + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        nan_d += tl.sum((xr != xr).to(tl.int32), axis=1)
        nan_a += tl.sum((yr != yr).to(tl.int32), axis=1)
        inf_d += tl.sum((xr == float("inf")).to(tl.int32), axis=1)
        inf_a += tl.sum((yr == float("inf")).to(tl.int32), axis=1)
        x = tl.where(xr != xr, float("-inf"), xr)
        y = tl.where(yr != yr, float("-inf"), yr)
        pl = _weighted(cd, x) + _weighted(ca, y)
        m_d, s_d = _online(m_d, s_d, x * inv_t[:, None])
        m_p, s_p = _online(m_p, s_p, pl * inv_t[:, None])
        m_a, s_a = _online(m_a, s_a, y * inv_ts[:, None])
        if NUCLEUS:
            m_raw = tl.maximum(m_raw, tl.max(x, axis=1))
    lse_d = m_d + tl.log(s_d)
    lse_p = m_p + tl.log(s_p)
    lse_a = m_a + tl.log(s_a)

    xtok = tl.load(drafts_ptr + rows_c, mask=rmask, other=0)
    lx = _clean(tl.load(dlm_ptr + base_d + xtok, mask=rmask, other=0.0))
    ly = _clean(tl.load(ar_ptr + base_a + xtok, mask=rmask, other=0.0))
    plx = _weighted(cd, lx) + _weighted(ca, ly)
    so = stats_ptr + rows_c * _NSTATS
    tl.store(so + _S_LP, plx * inv_t - lse_p, mask=rmask)
    tl.store(so + _S_LA, ly * inv_ts - lse_a, mask=rmask)
    tl.store(so + _S_LD, lx, mask=rmask)
    tl.store(so + _S_LR, ly, mask=rmask)
    tl.store(so + _S_LSE_D, lse_d, mask=rmask)
    tl.store(so + _S_LSE_P, lse_p, mask=rmask)
    tl.store(so + _S_LSE_A, lse_a, mask=rmask)
    fo = flags_ptr + rows_c * (3 * _NFLAGS)             # inputs: dlm_logits, ar_logits, the PoE logits
    tl.store(fo + _F_NAN, nan_d, mask=rmask)
    tl.store(fo + _F_PINF, inf_d, mask=rmask)
    tl.store(fo + _F_EMPTY, _not_finite(lse_d), mask=rmask)
    tl.store(fo + _NFLAGS + _F_NAN, nan_a, mask=rmask)
    tl.store(fo + _NFLAGS + _F_PINF, inf_a, mask=rmask)
    tl.store(fo + _NFLAGS + _F_EMPTY, _not_finite(lse_a), mask=rmask)
    tl.store(fo + 2 * _NFLAGS + _F_EMPTY, _not_finite(lse_p), mask=rmask)
    # log q(x) last: the nucleus select's passes run with little else live
    if NUCLEUS:   # q = the nucleus draft drew from; its descriptor is kept for the residual pass
        # masked by m_raw rather than rmask: a predicate kept across the select's loops spills
        # on sm_80; an entirely -inf row (no store) is an error the caller reports
        live = m_raw > float("-inf")
        m_raw = tl.where(live, m_raw, 0.0)
        tkey, cut, mass = _nucleus(dlm_ptr + base_d, live, V, m_raw, inv_t, top_p, BLOCK_R, BLOCK_S)
        log_q = tl.where(_in_nucleus(lx, xtok, tkey, cut),
                         ((lx - m_raw) * inv_t).to(tl.float64) - tl.log(mass), float("-inf"))
        tl.store(nkey_ptr + rows_c * 2 + 0, tkey.to(tl.int64), mask=live)
        tl.store(nkey_ptr + rows_c * 2 + 1, cut.to(tl.int64), mask=live)
        tl.store(nval_ptr + rows_c * 2 + 0, m_raw.to(tl.float64), mask=live)
        tl.store(nval_ptr + rows_c * 2 + 1, mass, mask=live)
    else:
        live = rmask
        log_q = tl.where(lx > float("-inf"), lx * inv_t - lse_d, float("-inf"))
    tl.store(so + _S_LQ, log_q, mask=live)


@triton.jit
def _verify_scan_kernel(stats_ptr, u_ptr, nacc_ptr, term_ptr, BK, W,
                        PARITY: tl.constexpr, BLOCK_BK: tl.constexpr, BLOCK_W: tl.constexpr):
    pid = tl.program_id(0)
    bk = pid * BLOCK_BK + tl.arange(0, BLOCK_BK)
    jj = tl.arange(0, BLOCK_W)
    bmask = bk < BK
    m2 = bmask[:, None] & (jj < W)[None, :]
    bk_c = tl.where(bmask, bk, 0).to(tl.int64)
    row = bk_c[:, None] * W + jj[None, :]
    so = stats_ptr + row * _NSTATS
    log_q = tl.load(so + _S_LQ, mask=m2, other=float("-inf")).to(tl.float64)
    log_p = tl.load(so + _S_LP, mask=m2, other=0.0).to(tl.float64)
    log_a = tl.load(so + _S_LA, mask=m2, other=0.0).to(tl.float64)
    ld = tl.load(so + _S_LD, mask=m2, other=0.0).to(tl.float64)
    lr = tl.load(so + _S_LR, mask=m2, other=0.0).to(tl.float64)
    u = tl.load(u_ptr + bk_c[:, None] * (W + 1) + jj[None, :], mask=m2, other=0.5)
    accept = (log_q > float("-inf")) & (tl.log(u) < log_p - log_q)
    first_rej = tl.min(tl.where(m2 & ~accept, jj[None, :], W), axis=1)
    emitted = m2 & (jj[None, :] < first_rej[:, None])
    if PARITY:
        t = lr - ld
    else:
        t = log_a - log_p
    term = tl.sum(tl.where(emitted, t, 0.0), axis=1)
    tl.store(nacc_ptr + bk_c, first_rej.to(tl.int64), mask=bmask)
    tl.store(term_ptr + bk_c, term, mask=bmask)


@triton.jit
def _target_and_residual(d_row, a_row, cols, live, V, inv_t, q_off, q_scale, tkey, cut, lse_p, cd, ca,
                         NUCLEUS: tl.constexpr):
    """One vocabulary block of the PoE target p and the residual (p - q)_+ (both normalised
    through the row statistics of the first pass; q as in _proposal), and the block's validity mask."""
    x, m2 = _load_row_block(d_row, cols, live, V)
    y, _ = _load_row_block(a_row, cols, live, V)
    q = _proposal(x, cols, inv_t, q_off, q_scale, tkey, cut, NUCLEUS)
    p = tl.exp((_weighted(cd, x) + _weighted(ca, y)) * inv_t[:, None] - lse_p[:, None])
    return p, tl.maximum(p - q, 0.0), m2


@triton.jit
def _verify_residual_kernel(dlm_ptr, ar_ptr, temps_ptr, stats_ptr, nkey_ptr, nval_ptr, u_ptr, nacc_ptr,
                            tok_ptr, extra_ptr, BK, K, W, V, dB, dK, dW, aB, aK, aW, w, inv_t_star,
                            PARITY: tl.constexpr, NUCLEUS: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    bk = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    bmask = bk < BK
    bk_c = tl.where(bmask, bk, 0).to(tl.int64)
    n = tl.load(nacc_ptr + bk_c, mask=bmask, other=W)
    live = bmask & (n < W)                         # rows with a rejection: the only ones read
    j = tl.where(live, n, 0)
    b = bk_c // K
    k = bk_c % K
    d_row = dlm_ptr + b * dB + k * dK + j * dW
    a_row = ar_ptr + b * aB + k * aK + j * aW
    row = bk_c * W + j
    lse_d = tl.load(stats_ptr + row * _NSTATS + _S_LSE_D, mask=live, other=0.0)
    lse_p = tl.load(stats_ptr + row * _NSTATS + _S_LSE_P, mask=live, other=0.0)
    lse_a = tl.load(stats_ptr + row * _NSTATS + _S_LSE_A, mask=live, other=0.0)
    T = tl.load(temps_ptr + bk_c, mask=live, other=1.0)
    inv_t = 1.0 / T
    inv_ts = tl.where(inv_t_star > 0, inv_t_star + 0.0 * inv_t, inv_t)
    u = tl.load(u_ptr + bk_c * (W + 1) + W, mask=live, other=0.5)
    if NUCLEUS:   # q(v) = e(v) / mass on the nucleus of the verify pass (same tkey, cut, max, mass)
        tkey = tl.load(nkey_ptr + row * 2 + 0, mask=live, other=0).to(tl.uint32)
        cut = tl.load(nkey_ptr + row * 2 + 1, mask=live, other=0).to(tl.int32)
        q_off = tl.load(nval_ptr + row * 2 + 0, mask=live, other=0.0).to(tl.float32)
        q_scale = (1.0 / tl.load(nval_ptr + row * 2 + 1, mask=live, other=1.0)).to(tl.float32)
    else:
        tkey = tl.zeros([BLOCK_R], tl.uint32)
        cut = tl.zeros([BLOCK_R], tl.int32)
        q_off = lse_d
        q_scale = tl.full([BLOCK_R], 1.0, tl.float32)
    cd = w
    ca = 1.0 - w
    cols0 = tl.arange(0, BLOCK_V)
    v_end = tl.max(tl.where(live, V, 0), axis=0)   # 0 when no row of the tile was rejected: no loop

    # pass 1: totals of (p - q)_+ and of p, float64 in token-id chunk order
    tot_r = tl.zeros([BLOCK_R], tl.float64)
    tot_p = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        p, r, m2 = _target_and_residual(d_row, a_row, cols, live, V, inv_t, q_off, q_scale, tkey, cut, lse_p,
                                        cd, ca, NUCLEUS)
        tot_r += tl.sum(r.to(tl.float64), axis=1)
        tot_p += tl.sum(p.to(tl.float64), axis=1)
    use_p = ~(tot_r > 0.0)
    target = u * tl.where(use_p, tot_p, tot_r)

    # pass 2: first token (id order) whose cumulative weight exceeds target
    cum = tl.zeros([BLOCK_R], tl.float64)
    ytok = tl.full([BLOCK_R], -1, tl.int32)
    last = tl.full([BLOCK_R], -1, tl.int32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        p, r, m2 = _target_and_residual(d_row, a_row, cols, live, V, inv_t, q_off, q_scale, tkey, cut, lse_p,
                                        cd, ca, NUCLEUS)
        v = tl.where(use_p[:, None], p, r)
        v = tl.where(m2, v, 0.0).to(tl.float64)
        ytok, last, cum = _inverse_cdf_block(v, cols, cum, target, ytok, last)
    ytok = tl.where(ytok < 0, tl.maximum(last, 0), ytok)

    lx = _clean(tl.load(d_row + ytok, mask=live, other=0.0))
    ly = _clean(tl.load(a_row + ytok, mask=live, other=0.0))
    if PARITY:
        extra = ly.to(tl.float64) - lx.to(tl.float64)
    else:
        pl = _weighted(cd, lx) + _weighted(ca, ly)
        extra = (ly * inv_ts - lse_a).to(tl.float64) - (pl * inv_t - lse_p).to(tl.float64)
    tl.store(tok_ptr + bk_c, tl.where(live, ytok, -1).to(tl.int64), mask=bmask)
    tl.store(extra_ptr + bk_c, tl.where(live, extra, 0.0), mask=bmask)


# ---------------------------------------------------------------------------------------------
# poe_draft
# ---------------------------------------------------------------------------------------------

@triton.jit
def _draft_kernel(logits_ptr, temps_ptr, u_ptr, tok_ptr, logq_ptr, flags_ptr,
                  R, K, W, V, sB, sW, top_p: tl.float64,
                  NUCLEUS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                  BLOCK_S: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)      # rows = (b, k, j), the layout of the outputs
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    b = rows_c // (K * W)
    k = (rows_c // W) % K
    j = rows_c % W
    row_ptr = logits_ptr + b * sB + j * sW
    T = tl.load(temps_ptr + b * K + k, mask=rmask, other=1.0)
    inv_t = 1.0 / T
    u = tl.load(u_ptr + rows_c, mask=rmask, other=0.5)
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)     # of l / T
    s = tl.zeros([BLOCK_R], tl.float32)
    m_raw = tl.full([BLOCK_R], float("-inf"), tl.float32)  # of l (the nucleus masses' reference)
    nan = tl.zeros([BLOCK_R], tl.int32)
    pinf = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        m2 = rmask[:, None] & (cols < V)[None, :]
        xr = tl.load(row_ptr[:, None] + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        nan += tl.sum((xr != xr).to(tl.int32), axis=1)
        pinf += tl.sum((xr == float("inf")).to(tl.int32), axis=1)
        x = tl.where(xr != xr, float("-inf"), xr)
        m, s = _online(m, s, x * inv_t[:, None])
        if NUCLEUS:
            m_raw = tl.maximum(m_raw, tl.max(x, axis=1))
    live = rmask & (m > float("-inf"))
    if NUCLEUS:
        offset = tl.where(live, m_raw, 0.0)
        tkey, cut, total = _nucleus(row_ptr, live, V, offset, inv_t, top_p, BLOCK_R, BLOCK_S)
    else:
        offset = tl.where(live, m, 0.0)
        tkey = tl.zeros([BLOCK_R], tl.uint32)
        cut = tl.zeros([BLOCK_R], tl.int32)
        total = s.to(tl.float64)
    one = tl.full([BLOCK_R], 1.0, tl.float32)
    # inverse CDF of the proposal (float64 accumulation in token-id order) with the given uniform
    target = u * total
    cum = tl.zeros([BLOCK_R], tl.float64)
    xtok = tl.full([BLOCK_R], -1, tl.int32)
    last = tl.full([BLOCK_R], -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        x, m2 = _load_row_block(row_ptr, cols, rmask, V)
        e = _proposal(x, cols, inv_t, offset, one, tkey, cut, NUCLEUS)
        e = tl.where(m2, e, 0.0).to(tl.float64)
        xtok, last, cum = _inverse_cdf_block(e, cols, cum, target, xtok, last)
    xtok = tl.where(xtok < 0, tl.maximum(last, 0), xtok)
    lx = _clean(tl.load(row_ptr + xtok, mask=rmask, other=0.0))
    if NUCLEUS:
        log_q = ((lx - offset) * inv_t).to(tl.float64) - tl.log(total)
    else:
        log_q = lx * inv_t - (m + tl.log(s))
    tl.store(tok_ptr + rows_c, xtok.to(tl.int64), mask=rmask)
    tl.store(logq_ptr + rows_c, log_q, mask=rmask)
    tl.store(flags_ptr + rows_c * _NFLAGS + _F_NAN, nan, mask=rmask)
    tl.store(flags_ptr + rows_c * _NFLAGS + _F_PINF, pinf, mask=rmask)
    tl.store(flags_ptr + rows_c * _NFLAGS + _F_EMPTY, (m == float("-inf")).to(tl.int32), mask=rmask)


# ---------------------------------------------------------------------------------------------
# product_of_experts
# ---------------------------------------------------------------------------------------------

@triton.jit
def _combine_acc(acc, masked, ptr, rs, w, rows_c, cols, m2):
    x = tl.load(ptr + rows_c[:, None] * rs + cols[None, :], mask=m2 & (w != 0.0), other=0.0).to(tl.float32)
    is_masked = (x == float("-inf")) & (w != 0.0)
    return acc + tl.where(is_masked | (w == 0.0), 0.0, w * x), masked | is_masked


@triton.jit
def _combine_row(p0, p1, p2, p3, part_ptr, rs0, rs1, rs2, rs3, w0, w1, w2, w3, rows_c, cols, m2,
                 NUM_E: tl.constexpr, HAS_PART: tl.constexpr):
    if HAS_PART:   # a partial float32 sum of earlier experts (-inf where masked), row-major [R, V]
        pv = tl.load(part_ptr + cols[None, :], mask=m2, other=0.0)
        acc = tl.where(pv == float("-inf"), 0.0, pv)
        masked = pv == float("-inf")
    else:
        acc = tl.zeros(cols[None, :].shape, tl.float32) + tl.zeros(rows_c[:, None].shape, tl.float32)
        masked = acc != acc
    acc, masked = _combine_acc(acc, masked, p0, rs0, w0, rows_c, cols, m2)
    if NUM_E > 1:
        acc, masked = _combine_acc(acc, masked, p1, rs1, w1, rows_c, cols, m2)
    if NUM_E > 2:
        acc, masked = _combine_acc(acc, masked, p2, rs2, w2, rows_c, cols, m2)
    if NUM_E > 3:
        acc, masked = _combine_acc(acc, masked, p3, rs3, w3, rows_c, cols, m2)
    return tl.where(masked, float("-inf"), acc)


@triton.jit
def _combine_kernel(p0, p1, p2, p3, part_ptr, out_ptr, R, V, rs0, rs1, rs2, rs3, w0, w1, w2, w3, inv_t,
                    NUM_E: tl.constexpr, HAS_PART: tl.constexpr, FINAL: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """FINAL: out = log_softmax(acc * inv_t) ([R, V] float32); else out = acc (a partial sum)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK_V)
    pp = part_ptr + rows_c[:, None] * V   # row-major partial buffer
    if FINAL:
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            m2 = rmask[:, None] & (cols < V)[None, :]
            acc = _combine_row(p0, p1, p2, p3, pp, rs0, rs1, rs2, rs3, w0, w1, w2, w3, rows_c, cols, m2,
                               NUM_E, HAS_PART)
            acc = tl.where(m2, acc * inv_t, float("-inf"))
            m, s = _online(m, s, acc)
        lse = m + tl.log(s)
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            m2 = rmask[:, None] & (cols < V)[None, :]
            acc = _combine_row(p0, p1, p2, p3, pp, rs0, rs1, rs2, rs3, w0, w1, w2, w3, rows_c, cols, m2,
                               NUM_E, HAS_PART)
            tl.store(out_ptr + rows_c[:, None] * V + cols[None, :], acc * inv_t - lse[:, None], mask=m2)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + cols0
            m2 = rmask[:, None] & (cols < V)[None, :]
            acc = _combine_row(p0, p1, p2, p3, pp, rs0, rs1, rs2, rs3, w0, w1, w2, w3, rows_c, cols, m2,
                               NUM_E, HAS_PART)
            tl.store(out_ptr + rows_c[:, None] * V + cols[None, :], acc, mask=m2)


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _tiles(t: torch.Tensor, R: int, V: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps): GPU = one row per program, interpreter = big 2-D tiles (up to
    1024 rows: its cost is per program and per op, hardly per element)."""
    if _interpreted(t):
        bv = min(triton.next_power_of_2(max(V, 1)), 4096)
        br = max(1, min(triton.next_power_of_2(max(R, 1)), 65536 // bv, 1024))
        return br, bv, 1
    bv = min(triton.next_power_of_2(max(V, 1)), 2048)
    return 1, bv, 4 if bv <= 1024 else 8


def _select_tile(t: torch.Tensor, bv: int) -> int:
    """BLOCK_S of the nucleus select passes, whose one-hot digit tiles are [BLOCK_R, BLOCK_S, 16]
    float64: on a GPU 256 columns (16 float64 per thread at 8 warps: no spills)."""
    return bv if _interpreted(t) else min(bv, 256)


def poe_draft(dlm_logits, temperatures, top_p, uniforms, allow_nan):
    """poe_draft backend: ``(tokens [B, K, W] int64, log_q [B, K, W] float32, status [1, 3])``
    (diffkern.ops.poe raises from the status and returns the rest)."""
    x = dlm_logits if dlm_logits.stride(-1) == 1 else dlm_logits.contiguous()
    B, W, V = x.shape
    K = temperatures.shape[1]
    dev = x.device
    temps = temperatures.float().contiguous()
    u = uniforms.double().contiguous()
    R = B * K * W
    tokens = torch.empty(B, K, W, dtype=torch.int64, device=dev)
    log_q = torch.empty(B, K, W, dtype=torch.float32, device=dev)
    flags = torch.zeros(R, 1, _NFLAGS, dtype=torch.int32, device=dev)
    br, bv, nw = _tiles(x, R, V)
    _draft_kernel[(triton.cdiv(R, br),)](x, temps, u, tokens, log_q, flags, R, K, W, V,
                                         x.stride(0), x.stride(1), float(top_p), NUCLEUS=top_p < 1.0,
                                         BLOCK_R=br, BLOCK_V=bv, BLOCK_S=_select_tile(x, bv), num_warps=nw)
    return tokens, log_q, flags.sum(0)


def poe_verify(dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
               target_temperature, uniforms, parity, allow_nan):
    """poe_verify backend: ``(num_accepted [B, K], residual token [B, K] (-1: none), accepted-prefix
    term [B, K] float64, residual-token term [B, K] float64, status [3, 3])``; diffkern.ops.poe
    raises from the status and finishes (corrected tokens, parity mean, incoming log-weights).
    No host synchronisation: rows that fail the status are computed without faulting and discarded."""
    nucleus = top_p < 1.0 and not parity      # parity verifies against the full softmax
    d = dlm_logits if dlm_logits.stride(-1) == 1 else dlm_logits.contiguous()   # stride-0 K kept
    a = ar_logits if ar_logits.stride(-1) == 1 else ar_logits.contiguous()
    B, K, W, V = a.shape
    dev = a.device
    drafts = draft_tokens.long().contiguous()
    temps = temperatures.float().contiguous()
    u = uniforms.double().contiguous()
    R, BK = B * K * W, B * K
    w = float(weight)
    t_star = 1.0 / float(target_temperature) if target_temperature > 0 else 0.0   # 1/T* (0: T_k)
    stats = torch.empty(R, _NSTATS.value, dtype=torch.float32, device=dev)
    flags = torch.zeros(R, 3, _NFLAGS, dtype=torch.int32, device=dev)   # dlm_logits, ar_logits, PoE logits
    # nucleus descriptor per row: (threshold key, last kept tie id), (max l_D, nucleus mass)
    nkey = torch.empty(R if nucleus else 1, 2, dtype=torch.int64, device=dev)
    nval = torch.empty(R if nucleus else 1, 2, dtype=torch.float64, device=dev)
    br, bv, nw = _tiles(a, R, V)
    _verify_rows_kernel[(triton.cdiv(R, br),)](
        d, a, drafts, temps, stats, flags, nkey, nval, R, K, W, V, d.stride(0), d.stride(1), d.stride(2),
        a.stride(0), a.stride(1), a.stride(2), w, t_star, float(top_p), NUCLEUS=nucleus,
        BLOCK_R=br, BLOCK_V=bv, BLOCK_S=_select_tile(a, bv), num_warps=nw)

    nacc = torch.empty(BK, dtype=torch.int64, device=dev)
    term = torch.empty(BK, dtype=torch.float64, device=dev)
    bw = triton.next_power_of_2(W)
    bbk = max(1, min(triton.next_power_of_2(BK), max(1, (4096 if _interpreted(a) else 1024) // bw)))
    _verify_scan_kernel[(triton.cdiv(BK, bbk),)](stats, u, nacc, term, BK, W, PARITY=bool(parity),
                                                BLOCK_BK=bbk, BLOCK_W=bw, num_warps=1 if _interpreted(a) else 4)

    ytok = torch.empty(BK, dtype=torch.int64, device=dev)
    extra = torch.empty(BK, dtype=torch.float64, device=dev)
    br2, bv2, nw2 = _tiles(a, BK, V)
    _verify_residual_kernel[(triton.cdiv(BK, br2),)](
        d, a, temps, stats, nkey, nval, u, nacc, ytok, extra, BK, K, W, V, d.stride(0), d.stride(1),
        d.stride(2), a.stride(0), a.stride(1), a.stride(2), w, t_star, PARITY=bool(parity), NUCLEUS=nucleus,
        BLOCK_R=br2, BLOCK_V=bv2, num_warps=nw2)
    return nacc.view(B, K), ytok.view(B, K), term.view(B, K), extra.view(B, K), flags.sum(0)


_MAX_E = 4


def product_of_experts(logits, weights, temperature):
    """product_of_experts backend: ``log_softmax(sum_e w_e l_e / T)``, float32 ``[..., V]``."""
    first = logits[0]
    shape = first.shape
    V = shape[-1]
    R = first.numel() // max(V, 1)
    dev = first.device
    flat = [t.reshape(R, V) for t in logits]
    flat = [t if t.stride(-1) == 1 else t.contiguous() for t in flat]
    out = torch.empty(R, V, dtype=torch.float32, device=dev)
    if R == 0 or V == 0:
        return out.view(shape)
    br, bv, nw = _tiles(first, R, V)
    grid = (triton.cdiv(R, br),)
    inv_t = 1.0 / float(temperature)
    part = None
    groups = [list(range(i, min(i + _MAX_E, len(flat)))) for i in range(0, len(flat), _MAX_E)]
    for gi, g in enumerate(groups):
        final = gi == len(groups) - 1
        ptrs = [flat[i] for i in g] + [flat[g[0]]] * (_MAX_E - len(g))
        ws = [float(weights[i]) for i in g] + [0.0] * (_MAX_E - len(g))
        rs = [p.stride(0) for p in ptrs]
        dst = out if final else torch.empty(R, V, dtype=torch.float32, device=dev)
        _combine_kernel[grid](*ptrs, part if part is not None else out, dst, R, V, *rs, *ws, inv_t,
                              NUM_E=len(g), HAS_PART=part is not None, FINAL=final,
                              BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
        part = dst
    return out.view(shape)
