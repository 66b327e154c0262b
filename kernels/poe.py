"""Triton kernels of the PoE operator family (``diffkern.ops.poe``; the float64 reference there is
the spec, ``csrc/cpu/poe.cpp`` the CPU fast path whose conventions these kernels follow).

Kernels (every one works on 2-D tiles ``[BLOCK_R rows, BLOCK_V vocabulary]``: on a GPU
``BLOCK_R = 1`` and ``BLOCK_V`` <= 2048; under ``TRITON_INTERPRET=1`` large tiles, because the
interpreter's cost is per program-iteration, not per element):

* ``_verify_rows_kernel``  one streaming pass per (b, k, j) row over l_D (stride-0 in K allowed: the
  shared ``[B, W, V]`` DLM logits are read through their strides, never copied) and l_AR: online
  (max, sum-exp) of l_D/T, the PoE logits (w l_D + (1-w) l_AR)/T (``0 * (-inf) = 0``) and l_AR/T*,
  gathers at the drafted token, NaN / +inf counters.
* ``_verify_scan_kernel``   per (b, k): acceptance ``log u_j < log p(x_j) - log q(x_j)`` over the
  window, first rejected index, importance (or parity "energy") term of the accepted prefix.
* ``_verify_residual_kernel`` per (b, k), only rows with a rejection do any loads: inverse CDF in
  token-id order (float64 accumulation) of ``(p - q)_+`` (``p`` when that is zero) with the
  residual uniform, and the emitted token's log-weight term.
* ``_draft_kernel``         per (b, k, j): top_p = 1 proposal ``softmax(l_D / T)``, inverse CDF in
  token-id order (float64 accumulation) with the given uniform.
* ``_combine_kernel``       product_of_experts: log_softmax(sum_e w_e l_e / T), up to 4 experts per
  launch (more are folded in groups through a float32 partial sum), -inf masking rule.

The nucleus (top_p < 1) proposal is not implemented here: ``diffkern.ops.poe``'s triton ``check``
reports it, and dispatch explains it when the backend is forced.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["draft", "verify", "combine", "KERNELS"]

# Column layout of the per-row statistics buffer of the verify pass (float32).
_S_LQ, _S_LP, _S_LA, _S_LD, _S_LR, _S_LSE_D, _S_LSE_P, _S_LSE_A = range(8)
_NSTATS = 8


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
def _weighted(w, x):
    """w * x with 0 * (-inf) = 0."""
    return tl.where(w == 0.0, 0.0, w * x)


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
def _verify_rows_kernel(dlm_ptr, ar_ptr, drafts_ptr, temps_ptr, stats_ptr, flags_ptr,
                        R, K, W, V, dB, dK, dW, aB, aK, aW, w, inv_t_star,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
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
    lse_d = m_d + tl.log(s_d)
    lse_p = m_p + tl.log(s_p)
    lse_a = m_a + tl.log(s_a)

    xtok = tl.load(drafts_ptr + rows_c, mask=rmask, other=0)
    lx = _clean(tl.load(dlm_ptr + base_d + xtok, mask=rmask, other=0.0))
    ly = _clean(tl.load(ar_ptr + base_a + xtok, mask=rmask, other=0.0))
    plx = _weighted(cd, lx) + _weighted(ca, ly)
    log_q = tl.where(lx > float("-inf"), lx * inv_t - lse_d, float("-inf"))
    log_p = plx * inv_t - lse_p
    log_a = ly * inv_ts - lse_a
    so = stats_ptr + rows_c * 8
    tl.store(so + 0, log_q, mask=rmask)
    tl.store(so + 1, log_p, mask=rmask)
    tl.store(so + 2, log_a, mask=rmask)
    tl.store(so + 3, lx, mask=rmask)
    tl.store(so + 4, ly, mask=rmask)
    tl.store(so + 5, lse_d, mask=rmask)
    tl.store(so + 6, lse_p, mask=rmask)
    tl.store(so + 7, lse_a, mask=rmask)
    fo = flags_ptr + rows_c * 4
    tl.store(fo + 0, nan_d, mask=rmask)
    tl.store(fo + 1, inf_d, mask=rmask)
    tl.store(fo + 2, nan_a, mask=rmask)
    tl.store(fo + 3, inf_a, mask=rmask)


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
    so = stats_ptr + row * 8
    log_q = tl.load(so + 0, mask=m2, other=float("-inf")).to(tl.float64)
    log_p = tl.load(so + 1, mask=m2, other=0.0).to(tl.float64)
    log_a = tl.load(so + 2, mask=m2, other=0.0).to(tl.float64)
    ld = tl.load(so + 3, mask=m2, other=0.0).to(tl.float64)
    lr = tl.load(so + 4, mask=m2, other=0.0).to(tl.float64)
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
def _target_and_residual(dlm_ptr, ar_ptr, base_d, base_a, cols, live, V, inv_t, lse_d, lse_p, cd, ca):
    """One vocabulary block of the PoE target p and the residual (p - q)_+ (both normalised
    through the row statistics of the first pass), and the block's validity mask."""
    m2 = live[:, None] & (cols < V)[None, :]
    x = _clean(tl.load(dlm_ptr + base_d[:, None] + cols[None, :], mask=m2, other=float("-inf")))
    y = _clean(tl.load(ar_ptr + base_a[:, None] + cols[None, :], mask=m2, other=float("-inf")))
    q = tl.exp(x * inv_t[:, None] - lse_d[:, None])
    p = tl.exp((_weighted(cd, x) + _weighted(ca, y)) * inv_t[:, None] - lse_p[:, None])
    return p, tl.maximum(p - q, 0.0), m2


@triton.jit
def _verify_residual_kernel(dlm_ptr, ar_ptr, temps_ptr, stats_ptr, u_ptr, nacc_ptr, tok_ptr, extra_ptr,
                            BK, K, W, V, dB, dK, dW, aB, aK, aW, w, inv_t_star,
                            PARITY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    bk = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    bmask = bk < BK
    bk_c = tl.where(bmask, bk, 0).to(tl.int64)
    n = tl.load(nacc_ptr + bk_c, mask=bmask, other=W)
    live = bmask & (n < W)                         # rows with a rejection: the only ones read
    j = tl.where(live, n, 0)
    b = bk_c // K
    k = bk_c % K
    base_d = b * dB + k * dK + j * dW
    base_a = b * aB + k * aK + j * aW
    row = bk_c * W + j
    lse_d = tl.load(stats_ptr + row * 8 + 5, mask=live, other=0.0)
    lse_p = tl.load(stats_ptr + row * 8 + 6, mask=live, other=0.0)
    lse_a = tl.load(stats_ptr + row * 8 + 7, mask=live, other=0.0)
    T = tl.load(temps_ptr + bk_c, mask=live, other=1.0)
    inv_t = 1.0 / T
    inv_ts = tl.where(inv_t_star > 0, inv_t_star + 0.0 * inv_t, inv_t)
    u = tl.load(u_ptr + bk_c * (W + 1) + W, mask=live, other=0.5)
    cd = w
    ca = 1.0 - w
    cols0 = tl.arange(0, BLOCK_V)
    v_end = tl.max(tl.where(live, V, 0), axis=0)   # 0 when no row of the tile was rejected: no loop

    # pass 1: totals of (p - q)_+ and of p, float64 in token-id chunk order
    tot_r = tl.zeros([BLOCK_R], tl.float64)
    tot_p = tl.zeros([BLOCK_R], tl.float64)
    for start in range(0, v_end, BLOCK_V):
        cols = start + cols0
        p, r, m2 = _target_and_residual(dlm_ptr, ar_ptr, base_d, base_a, cols, live, V, inv_t, lse_d, lse_p, cd, ca)
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
        p, r, m2 = _target_and_residual(dlm_ptr, ar_ptr, base_d, base_a, cols, live, V, inv_t, lse_d, lse_p, cd, ca)
        v = tl.where(use_p[:, None], p, r)
        v = tl.where(m2, v, 0.0).to(tl.float64)
        ytok, last, cum = _inverse_cdf_block(v, cols, cum, target, ytok, last)
    ytok = tl.where(ytok < 0, tl.maximum(last, 0), ytok)

    lx = _clean(tl.load(dlm_ptr + base_d + ytok, mask=live, other=0.0))
    ly = _clean(tl.load(ar_ptr + base_a + ytok, mask=live, other=0.0))
    if PARITY:
        extra = ly.to(tl.float64) - lx.to(tl.float64)
    else:
        pl = _weighted(cd, lx) + _weighted(ca, ly)
        extra = (ly * inv_ts - lse_a).to(tl.float64) - (pl * inv_t - lse_p).to(tl.float64)
    tl.store(tok_ptr + bk_c, tl.where(live, ytok, -1).to(tl.int64), mask=bmask)
    tl.store(extra_ptr + bk_c, tl.where(live, extra, 0.0), mask=bmask)


# ---------------------------------------------------------------------------------------------
# poe_draft (top_p = 1)
# ---------------------------------------------------------------------------------------------

@triton.jit
def _draft_kernel(logits_ptr, temps_ptr, u_ptr, tok_ptr, logq_ptr, flags_ptr,
                  R, K, W, V, sB, sW,
                  BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)      # rows = (b, k, j), the layout of the outputs
    rmask = rows < R
    rows_c = tl.where(rmask, rows, 0).to(tl.int64)
    b = rows_c // (K * W)
    k = (rows_c // W) % K
    j = rows_c % W
    base = b * sB + j * sW
    T = tl.load(temps_ptr + b * K + k, mask=rmask, other=1.0)
    inv_t = 1.0 / T
    u = tl.load(u_ptr + rows_c, mask=rmask, other=0.5)
    cols0 = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_R], tl.float32)
    nan = tl.zeros([BLOCK_R], tl.int32)
    pinf = tl.zeros([BLOCK_R], tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        m2 = rmask[:, None] & (cols < V)[None, :]
        xr = tl.load(logits_ptr + base[:, None] + cols[None, :], mask=m2, other=float("-inf")).to(tl.float32)
        nan += tl.sum((xr != xr).to(tl.int32), axis=1)
        pinf += tl.sum((xr == float("inf")).to(tl.int32), axis=1)
        x = tl.where(xr != xr, float("-inf"), xr)
        m, s = _online(m, s, x * inv_t[:, None])
    ms = tl.where(m == float("-inf"), 0.0, m)
    # e = exp(l/T - m), total = sum e, accumulated in float64 in token-id order
    target = u * s.to(tl.float64)
    cum = tl.zeros([BLOCK_R], tl.float64)
    xtok = tl.full([BLOCK_R], -1, tl.int32)
    last = tl.full([BLOCK_R], -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        cols = start + cols0
        m2 = rmask[:, None] & (cols < V)[None, :]
        x = _clean(tl.load(logits_ptr + base[:, None] + cols[None, :], mask=m2, other=float("-inf")))
        e = tl.exp(x * inv_t[:, None] - ms[:, None])
        e = tl.where(m2, e, 0.0).to(tl.float64)
        xtok, last, cum = _inverse_cdf_block(e, cols, cum, target, xtok, last)
    xtok = tl.where(xtok < 0, tl.maximum(last, 0), xtok)
    lx = _clean(tl.load(logits_ptr + base + xtok, mask=rmask, other=0.0))
    log_q = lx * inv_t - (m + tl.log(s))
    tl.store(tok_ptr + rows_c, xtok.to(tl.int64), mask=rmask)
    tl.store(logq_ptr + rows_c, log_q, mask=rmask)
    tl.store(flags_ptr + rows_c * 3 + 0, nan, mask=rmask)
    tl.store(flags_ptr + rows_c * 3 + 1, pinf, mask=rmask)
    tl.store(flags_ptr + rows_c * 3 + 2, (m == float("-inf")).to(tl.int32), mask=rmask)


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


KERNELS = {
    "verify_rows": _verify_rows_kernel,
    "verify_scan": _verify_scan_kernel,
    "verify_residual": _verify_residual_kernel,
    "draft": _draft_kernel,
    "combine": _combine_kernel,
}


# ---------------------------------------------------------------------------------------------
# Launch helpers
# ---------------------------------------------------------------------------------------------

def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _tiles(t: torch.Tensor, R: int, V: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_V, num_warps): GPU = one row per program, interpreter = big 2-D tiles."""
    if _interpreted(t):
        bv = min(triton.next_power_of_2(max(V, 1)), 4096)
        br = max(1, min(triton.next_power_of_2(max(R, 1)), 65536 // bv, 64))
        return br, bv, 1
    bv = min(triton.next_power_of_2(max(V, 1)), 2048)
    return 1, bv, 4 if bv <= 1024 else 8


def _raise_flags(name: str, nan: int, pinf: int, empty: int, allow_nan: bool) -> None:
    if pinf:
        raise ValueError(f"{name}: contains +inf logits (only -inf, i.e. masked tokens, are legal)")
    if nan and not allow_nan:
        raise ValueError(f"{name}: contains NaN logits; pass allow_nan=True to treat NaN as -inf (masked)")
    if empty:
        raise ValueError(f"{name}: every row needs at least one finite logit; a row is entirely -inf")


def draft(dlm_logits, temperatures, top_p, uniforms, allow_nan):
    """poe_draft backend (top_p = 1): ``(tokens [B, K, W] int64, log_q [B, K, W] float32)``."""
    if top_p < 1.0:
        raise NotImplementedError("top_p < 1 not implemented in triton")
    x = dlm_logits if dlm_logits.stride(-1) == 1 else dlm_logits.contiguous()
    B, W, V = x.shape
    K = temperatures.shape[1]
    dev = x.device
    temps = temperatures.float().contiguous()
    u = uniforms.double().contiguous()
    R = B * K * W
    tokens = torch.empty(B, K, W, dtype=torch.int64, device=dev)
    log_q = torch.empty(B, K, W, dtype=torch.float32, device=dev)
    flags = torch.zeros(R, 3, dtype=torch.int32, device=dev)
    br, bv, nw = _tiles(x, R, V)
    _draft_kernel[(triton.cdiv(R, br),)](x, temps, u, tokens, log_q, flags, R, K, W, V,
                                         x.stride(0), x.stride(1), BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    f = flags.sum(0).tolist()
    _raise_flags("dlm_logits", f[0], f[1], f[2], allow_nan)
    return tokens, log_q


def verify(dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
           target_temperature, uniforms, parity, allow_nan):
    """poe_verify backend: ``(num_accepted, tokens, log_weights, corrected)`` (see diffkern.ops.poe)."""
    if top_p < 1.0 and not parity:
        raise NotImplementedError("top_p < 1 not implemented in triton")
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
    stats = torch.empty(R, _NSTATS, dtype=torch.float32, device=dev)
    flags = torch.zeros(R, 4, dtype=torch.int32, device=dev)
    br, bv, nw = _tiles(a, R, V)
    _verify_rows_kernel[(triton.cdiv(R, br),)](
        d, a, drafts, temps, stats, flags, R, K, W, V, d.stride(0), d.stride(1), d.stride(2),
        a.stride(0), a.stride(1), a.stride(2), w, t_star, BLOCK_R=br, BLOCK_V=bv, num_warps=nw)
    f = flags.sum(0).tolist()
    _raise_flags("dlm_logits", f[0], f[1], 0, allow_nan)
    _raise_flags("ar_logits", f[2], f[3], 0, allow_nan)
    lse = stats[:, _S_LSE_D:_S_LSE_A + 1]
    finite = torch.isfinite(lse).all(0).tolist() if R else [True] * 3
    if not finite[0]:
        raise ValueError("dlm_logits: every row needs at least one finite logit; a row is entirely -inf")
    if not finite[2]:
        raise ValueError("ar_logits: every row needs at least one finite logit; a row is entirely -inf")
    if not finite[1]:
        raise ValueError("dlm_logits/ar_logits: a row of the PoE logits w*l_D + (1-w)*l_AR is "
                         "entirely -inf (no token allowed by both experts)")

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
        d, a, temps, stats, u, nacc, ytok, extra, BK, K, W, V, d.stride(0), d.stride(1), d.stride(2),
        a.stride(0), a.stride(1), a.stride(2), w, t_star, PARITY=bool(parity), BLOCK_R=br2, BLOCK_V=bv2,
        num_warps=nw2)

    corrected = nacc < W
    tokens = drafts.clone()
    j = nacc.clamp_max(W - 1).view(B, K, 1)
    cur = tokens.gather(2, j).view(BK)
    tokens.scatter_(2, j, torch.where(corrected, ytok, cur).view(B, K, 1))
    total = term + extra
    if parity:
        total = total / (nacc + corrected.long()).clamp_min(1).double()
    lw = (log_weights.double().reshape(BK) + total).float()
    return nacc.view(B, K), tokens, lw.view(B, K), corrected.view(B, K)


_MAX_E = 4


def combine(logits, weights, temperature):
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
