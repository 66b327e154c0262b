"""Triton kernels of the TabDiff sampler family (``diffkern.ops.tabdiff``; the float64 reference
there is the spec, ``csrc/cpu/tabdiff.cpp`` with the per-cell math of
``csrc/include/diffkern/tabdiff.h`` the CPU fast path whose semantics these kernels mirror).

Kernels (one per operator; tiles ``[BLOCK_R rows, BLOCK_C columns]``: on a GPU about 512 cells,
under ``TRITON_INTERPRET=1`` up to 1024 rows, because the interpreter's cost is per program and
per op, hardly per element):

* ``_churn_kernel``   per row block: ``x + sqrt(max(s_hat^2 - s^2, 0)) eps`` over the numerical
  columns, then the re-mask ``u < remask_chance_j -> MASK`` of the categorical ones.
* ``_step_kernel``    grid ``(row blocks, m + 1)``: program ``j < m`` runs the unmask race of
  categorical column j on a ``[BLOCK_R, BLOCK_K]`` tile of its unpadded logit segment
  ``off_j .. off_j + K_j`` (``BLOCK_K >= max K_j + 1``; the MASK logit in the last slot is checked,
  never used); program ``m`` the Euler update of the numerical columns (and their slope ``d``).
* ``_heun_kernel``    per row block: Heun's correction.
* ``_observe_kernel`` per row block: observed cells re-drawn at the next level and merged with
  the sampled ones by the ``missing`` masks.

Every value is computed in float64 with the reference's operations in its order (logits of any
float dtype and the state in float32 or float64 are read and converted; results are rounded to
the state's dtype on store). The launchers disable FMA contraction (``enable_fp_fusion=False``):
``s_hat^2 - s^2`` must be exactly 0 when the levels are equal, as in the reference.

Random numbers: the shared Philox stream (``kernels/philox.py``) keyed by (seed, offset = step,
tag, global row, column), drawn in-kernel, never a ``[B, L]`` or ``[B, m, K_max + 1]`` tensor;
or the explicit float64 grids when the caller passes them (``GIVEN_*`` constexprs). A tile draws
only where some cell uses the draw (a masked cell for the race, a decoded cell with
``remask_chance > 0`` for the re-mask, an observed cell in the merge): a tile with none skips the
Philox rounds and, for the race, the logit loads; within a drawing tile the other lanes' draws
are discarded (the SIMD lanes run anyway). ``seed`` arrives as the int64 carrying a uint64's bits
(negative for seeds >= 2^63), which the stream reads back modulo 2^64.

Bad values are counted, not raised: ``status`` is int64 ``[3]`` (tabdiff.h's ``Status``: bad
category, non-finite denoised, bad logit segment of a masked cell), added with atomics; the
Python finish re-runs the reference's checks to raise the same error.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .philox import normal, uniform

__all__ = ["tabdiff_churn", "tabdiff_step", "tabdiff_heun", "tabdiff_observe"]

# Philox tags of the family (diffkern.ops.philox.TAGS, tabdiff.h's kTag*)
_TAG_CHURN, _TAG_REMASK, _TAG_UNMASK, _TAG_OBSERVED = (tl.constexpr(t) for t in (4, 5, 6, 7))
# Status slots (tabdiff.h's Status)
_BAD_CATEGORY, _NONFINITE_DENOISED, _BAD_LOGIT = (tl.constexpr(s) for s in range(3))
_STATUS_SLOTS = 3
_NO_SLOT = tl.constexpr(1 << 30)   # an index past every race slot


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _row_block(B, BLOCK_R: tl.constexpr):
    """The program's rows ``[BLOCK_R]`` (int64) and which of them exist."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < B


@triton.jit
def _cell_block(rows, live, start, width, BLOCK_C: tl.constexpr):
    """Tile ``[R, C]`` of columns ``start ..``: (row index [R, 1], column index [1, C], cell mask)."""
    cols = start + tl.arange(0, BLOCK_C)
    return rows[:, None], cols[None, :], live[:, None] & (cols < width)[None, :]


@triton.jit
def _load_f64(ptr, r, c, s0, s1, mask):
    """float64 values of a row-/column-strided [B, width] input at (r, c) (0 where masked)."""
    return tl.load(ptr + r * s0 + c * s1, mask=mask, other=0).to(tl.float64)


@triton.jit
def _column_table(ptr, c, width):
    """A per-column float table (any float dtype) at columns c, as float64."""
    return tl.load(ptr + c, mask=c < width, other=0).to(tl.float64)


@triton.jit
def _draw(given_ptr, s0, s1, r, c, mask, seed, step, row_start, col0, tag: tl.constexpr, GIVEN: tl.constexpr,
          NORMAL: tl.constexpr):
    """Random numbers of the cells (r [R, 1], c [.., C]): the explicit grid's at (r, c) (any float
    dtype, as float64), or the stream's at (seed, step, tag, row_start + r, col0 + c), uniform or
    standard normal."""
    if GIVEN:
        return tl.load(given_ptr + r * s0 + c * s1, mask=mask, other=0.5).to(tl.float64)
    else:
        row, col = tl.broadcast(row_start + r, col0 + c)
        if NORMAL:
            return normal(seed, step, tag, row, col)
        else:
            return uniform(seed, step, tag, row, col)


@triton.jit
def _count(status_ptr, slot: tl.constexpr, flags):
    """status[slot] += the number of set flags (one int64 atomic, none when zero)."""
    count = tl.sum(tl.sum(flags.to(tl.int32), axis=1), axis=0).to(tl.int64)
    tl.atomic_add(status_ptr + slot, count, mask=count > 0, sem="relaxed")


@triton.jit
def _not_finite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _race(x, slot, seg, K, alpha_t, alpha_s, u):
    """tabdiff.h's unmask_draw on [R, BLOCK_K] segments x (float64; slot K is the MASK logit,
    checked, never used; ``seg``: the slots 0..K of the masked rows) with slot uniforms ``u``:
    q_k = softmax_k * (alpha_s - alpha_t), q_K = 1 - alpha_s, the race argmax_k q_k /
    (1e-10 - log(u_k + 1e-10)), first maximum on ties. Returns (draw [R], bad [R]): bad = NaN or
    +inf in the segment, or every class logit -inf."""
    cls = seg & (slot < K)
    bad = tl.max((seg & ((x != x) | (x == float("inf")))).to(tl.int32), axis=1) > 0
    top = tl.max(tl.where(cls, x, float("-inf")), axis=1)
    bad = bad | (top == float("-inf"))
    z = x - tl.where(bad, 0.0, top)[:, None]
    log_sum = tl.log(tl.sum(tl.where(cls, tl.exp(z), 0.0), axis=1))
    q = tl.where(slot == K, 1.0 - alpha_s, tl.exp(z - log_sum[:, None]) * (alpha_s - alpha_t))
    key = tl.where(seg, q / (1e-10 - tl.log(u + 1e-10)), float("-inf"))   # the sampler's guard eps
    best = tl.max(key, axis=1)
    draw = tl.min(tl.where(seg & (key == best[:, None]), slot, _NO_SLOT), axis=1)
    return draw, bad


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["seed", "step", "row_start"])
def _churn_kernel(x_ptr, c_ptr, sc_ptr, sh_ptr, chance_ptr, k_ptr, noise_ptr, u_ptr, xo_ptr, co_ptr, status_ptr,
                  B, n, m, xs0, xs1, cs0, cs1, ns0, ns1, us0, us1, seed, step, row_start,
                  GIVEN_NOISE: tl.constexpr, GIVEN_UNIFORMS: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, live = _row_block(B, BLOCK_R)
    for start in range(0, n, BLOCK_C):
        r, c, ok = _cell_block(rows, live, start, n, BLOCK_C)
        sc = _column_table(sc_ptr, c, n)
        sh = _column_table(sh_ptr, c, n)
        var = sh * sh - sc * sc
        scale = tl.where(var > 0.0, tl.sqrt(tl.maximum(var, 0.0)), 0.0)
        eps = _draw(noise_ptr, ns0, ns1, r, c, ok, seed, step, row_start, 0, _TAG_CHURN, GIVEN_NOISE, True)
        x = _load_f64(x_ptr, r, c, xs0, xs1, ok)
        tl.store(xo_ptr + r * n + c, x + scale * eps, mask=ok)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int1)
    for start in range(0, m, BLOCK_C):
        r, c, ok = _cell_block(rows, live, start, m, BLOCK_C)
        v = tl.load(c_ptr + r * cs0 + c * cs1, mask=ok, other=0)
        K = tl.load(k_ptr + c, mask=c < m, other=0).to(tl.int64)
        chance = _column_table(chance_ptr, c, m)
        bad = bad | (ok & ((v < 0) | (v > K)))
        use = ok & (chance > 0.0) & (v != K)          # a draw can change the cell
        out = v
        if tl.max(tl.max(use.to(tl.int32), axis=1), axis=0) > 0:
            u = _draw(u_ptr, us0, us1, r, c, use, seed, step, row_start, 0, _TAG_REMASK, GIVEN_UNIFORMS, False)
            out = tl.where(use & (u < chance), K, v)
        tl.store(co_ptr + r * m + c, out, mask=ok)
    _count(status_ptr, _BAD_CATEGORY, bad)


@triton.jit(do_not_specialize=["seed", "step", "row_start"])
def _step_kernel(x_ptr, c_ptr, den_ptr, lg_ptr, sh_ptr, sn_ptr, k_ptr, off_ptr, at_ptr, as_ptr, u_ptr,
                 xo_ptr, co_ptr, d_ptr, status_ptr,
                 B, n, m, xs0, xs1, cs0, cs1, ds0, ds1, ls0, ls1, us0, us1, seed, step, row_start,
                 GIVEN_UNIFORMS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rows, live = _row_block(B, BLOCK_R)
    j = tl.program_id(1)
    if j < m:   # the unmask race of categorical column j
        K = tl.load(k_ptr + j)
        off = tl.load(off_ptr + j)
        v = tl.load(c_ptr + rows * cs0 + j * cs1, mask=live, other=0)
        masked = live & (v == K)
        bad_cat = live & ~masked & ((v < 0) | (v > K))
        _count(status_ptr, _BAD_CATEGORY, bad_cat[:, None])
        out = v
        if tl.max(masked.to(tl.int32), axis=0) > 0:   # some masked row: load its segment, draw
            slot = tl.arange(0, BLOCK_K)[None, :]
            seg = masked[:, None] & (slot <= K)
            r = rows[:, None]
            x = _load_f64(lg_ptr, r, off + slot, ls0, ls1, seg)
            u = _draw(u_ptr, us0, us1, r, off + slot, seg, seed, step, row_start, 0, _TAG_UNMASK, GIVEN_UNIFORMS,
                      False)
            alpha_t = tl.load(at_ptr + j).to(tl.float64)
            alpha_s = tl.load(as_ptr + j).to(tl.float64)
            draw, bad = _race(x, slot, seg, K, alpha_t, alpha_s, u)
            out = tl.where(masked, tl.where(bad, K, draw).to(tl.int64), v)
            _count(status_ptr, _BAD_LOGIT, (masked & bad)[:, None])
        tl.store(co_ptr + rows * m + j, out, mask=live)
    else:       # the Euler update of the numerical columns
        bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int1)
        for start in range(0, n, BLOCK_C):
            r, c, ok = _cell_block(rows, live, start, n, BLOCK_C)
            x = _load_f64(x_ptr, r, c, xs0, xs1, ok)
            D = _load_f64(den_ptr, r, c, ds0, ds1, ok)
            sh = _column_table(sh_ptr, c, n)
            sn = _column_table(sn_ptr, c, n)
            bad = bad | (ok & _not_finite(D))
            d = (x - D) / sh
            tl.store(xo_ptr + r * n + c, x + (sn - sh) * d, mask=ok)
            tl.store(d_ptr + r * n + c, d, mask=ok)
        _count(status_ptr, _NONFINITE_DENOISED, bad)


@triton.jit
def _heun_kernel(xh_ptr, xn_ptr, dn_ptr, d_ptr, sh_ptr, sn_ptr, out_ptr, status_ptr, B, n,
                 hs0, hs1, xs0, xs1, ds0, ds1, gs0, gs1, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, live = _row_block(B, BLOCK_R)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int1)
    for start in range(0, n, BLOCK_C):
        r, c, ok = _cell_block(rows, live, start, n, BLOCK_C)
        D = _load_f64(dn_ptr, r, c, ds0, ds1, ok)
        bad = bad | (ok & _not_finite(D))
        sh = _column_table(sh_ptr, c, n)
        sn = _column_table(sn_ptr, c, n)
        d_prime = (_load_f64(xn_ptr, r, c, xs0, xs1, ok) - D) / sn
        d = _load_f64(d_ptr, r, c, gs0, gs1, ok)
        x = _load_f64(xh_ptr, r, c, hs0, hs1, ok)
        tl.store(out_ptr + r * n + c, x + (sn - sh) * (0.5 * d + 0.5 * d_prime), mask=ok)
    _count(status_ptr, _NONFINITE_DENOISED, bad)


@triton.jit(do_not_specialize=["seed", "step", "row_start"])
def _observe_kernel(z_ptr, zc_ptr, xo_ptr, xc_ptr, nmiss_ptr, cmiss_ptr, sn_ptr, chance_ptr, k_ptr, noise_ptr,
                    u_ptr, on_ptr, oc_ptr, status_ptr,
                    B, n, m, zs0, zs1, zcs0, zcs1, os0, os1, ocs0, ocs1, nms0, nms1, cms0, cms1, ns0, ns1, us0, us1,
                    seed, step, row_start, GIVEN_NOISE: tl.constexpr, GIVEN_UNIFORMS: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows, live = _row_block(B, BLOCK_R)
    for start in range(0, n, BLOCK_C):
        r, c, ok = _cell_block(rows, live, start, n, BLOCK_C)
        missing = tl.load(nmiss_ptr + r * nms0 + c * nms1, mask=ok, other=1) != 0
        out = tl.load(z_ptr + r * zs0 + c * zs1, mask=ok & missing, other=0)
        observed = ok & ~missing
        if tl.max(tl.max(observed.to(tl.int32), axis=1), axis=0) > 0:
            eps = _draw(noise_ptr, ns0, ns1, r, c, observed, seed, step, row_start, 0, _TAG_OBSERVED, GIVEN_NOISE,
                        True)
            known = _load_f64(xo_ptr, r, c, os0, os1, observed) + _column_table(sn_ptr, c, n) * eps
            out = tl.where(missing, out, known.to(out.dtype))
        tl.store(on_ptr + r * n + c, out, mask=ok)
    bad = tl.zeros([BLOCK_R, BLOCK_C], tl.int1)
    for start in range(0, m, BLOCK_C):
        r, c, ok = _cell_block(rows, live, start, m, BLOCK_C)
        v = tl.load(xc_ptr + r * ocs0 + c * ocs1, mask=ok, other=0)
        K = tl.load(k_ptr + c, mask=c < m, other=0).to(tl.int64)
        bad = bad | (ok & ((v < 0) | (v > K)))
        missing = tl.load(cmiss_ptr + r * cms0 + c * cms1, mask=ok, other=1) != 0
        out = tl.load(zc_ptr + r * zcs0 + c * zcs1, mask=ok & missing, other=0)
        observed = ok & ~missing
        if tl.max(tl.max(observed.to(tl.int32), axis=1), axis=0) > 0:
            u = _draw(u_ptr, us0, us1, r, c, observed, seed, step, row_start, n, _TAG_OBSERVED, GIVEN_UNIFORMS,
                      False)
            out = tl.where(missing, out, tl.where(u < _column_table(chance_ptr, c, m), K, v))
        tl.store(oc_ptr + r * m + c, out, mask=ok)
    _count(status_ptr, _BAD_CATEGORY, bad)


# ---------------------------------------------------------------------------------------------
# Launch helpers (each takes the reference's arguments and returns (*outputs, status))
# ---------------------------------------------------------------------------------------------

_GPU_CELLS = 512                # cells per GPU tile: 4 warps x 32 threads x 4 float64 values
_INTERP_CELLS, _INTERP_ROWS = 65536, 1024


def _interpreted(t: torch.Tensor) -> bool:
    return t.device.type != "cuda"


def _tile(t: torch.Tensor, B: int, width: int, block_c: int = 0) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of a [B, width] row-block loop (``block_c``: a given tile
    width, e.g. the race's BLOCK_K, that sets the rows; the loop's own width then fits the rows)."""
    cells, rows, cap = (_INTERP_CELLS, _INTERP_ROWS, 4096) if _interpreted(t) else (_GPU_CELLS, _GPU_CELLS, 64)
    wide = block_c or min(triton.next_power_of_2(max(width, 1)), cap)
    br = max(1, min(triton.next_power_of_2(max(B, 1)), cells // wide, rows))
    bc = min(triton.next_power_of_2(max(width, 1)), cap, max(1, cells // br))
    num_warps = 1 if _interpreted(t) else 4 if wide <= 1024 else 8 if wide <= 2048 else 16
    return br, bc, num_warps


@functools.lru_cache(maxsize=64)
def _class_tables(num_classes: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``K_j`` and segment offsets ``off_j`` (K_j + 1 wide, MASK last) on ``device``."""
    offsets, start = [], 0
    for k in num_classes:
        offsets.append(start)
        start += k + 1
    as_tensor = lambda v: torch.tensor(v or [0], dtype=torch.int32, device=device)   # noqa: E731
    return as_tensor(list(num_classes)), as_tensor(offsets)


def _arg(t, like: torch.Tensor) -> torch.Tensor:
    """A kernel's pointer argument: ``t`` (1-D tables made contiguous), or a one-element stand-in
    for an absent (None) or empty tensor, which the kernel never reads."""
    if t is None or t.numel() == 0:
        return torch.zeros(1, dtype=like.dtype if t is None else t.dtype, device=like.device)
    return t.contiguous() if t.dim() == 1 else t


def _strides(t) -> tuple[int, int]:
    return (0, 0) if t is None else tuple(t.stride())


def _launch(kernel, grid, tensors, like, *scalars, **meta):
    kernel[grid](*(_arg(t, like) for t in tensors), *scalars, enable_fp_fusion=False, **meta)


def _status(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(_STATUS_SLOTS, dtype=torch.int64, device=like.device)


def _outputs(x_num: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's new state (``[B, n]`` in x_num's dtype, ``[B, m]`` int64) and its status."""
    B, n = x_num.shape
    return (torch.empty(B, n, dtype=x_num.dtype, device=x_num.device),
            torch.empty(B, m, dtype=torch.int64, device=x_num.device), _status(x_num))


def tabdiff_churn(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start, noise,
                  uniforms):
    """tabdiff_churn backend: ``(x_num_hat [B, n], x_cat_hat [B, m], status [3])``."""
    (B, n), m = x_num.shape, x_cat.shape[1]
    x_hat, c_hat, status = _outputs(x_num, m)
    if B and (n or m):
        k, _ = _class_tables(tuple(num_classes), x_num.device)
        br, bc, nw = _tile(x_num, B, max(n, m))
        _launch(_churn_kernel, (triton.cdiv(B, br),),
                (x_num, x_cat, sigma_cur, sigma_hat, remask_chance, k, noise, uniforms, x_hat, c_hat, status), x_num,
                B, n, m, *x_num.stride(), *x_cat.stride(), *_strides(noise), *_strides(uniforms), seed, step,
                row_start, GIVEN_NOISE=noise is not None, GIVEN_UNIFORMS=uniforms is not None, BLOCK_R=br,
                BLOCK_C=bc, num_warps=nw)
    return x_hat, c_hat, status


def tabdiff_step(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes, alpha_t, alpha_s,
                 seed, step, row_start, uniforms):
    """tabdiff_step backend: ``(x_num_next [B, n], x_cat_next [B, m], d [B, n], status [3])``."""
    (B, n), m = x_num_hat.shape, x_cat_hat.shape[1]
    x_next, c_next, status = _outputs(x_num_hat, m)
    slope = torch.empty_like(x_next)
    if B and (n or m):
        k, off = _class_tables(tuple(num_classes), x_num_hat.device)
        block_k = triton.next_power_of_2(max(num_classes, default=1) + 1)
        br, bc, nw = _tile(x_num_hat, B, n, block_c=block_k)
        _launch(_step_kernel, (triton.cdiv(B, br), m + 1),
                (x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, k, off, alpha_t, alpha_s, uniforms,
                 x_next, c_next, slope, status), x_num_hat,
                B, n, m, *x_num_hat.stride(), *x_cat_hat.stride(), *denoised.stride(), *logits.stride(),
                *_strides(uniforms), seed, step, row_start, GIVEN_UNIFORMS=uniforms is not None, BLOCK_R=br,
                BLOCK_C=bc, BLOCK_K=block_k, num_warps=nw)
    return x_next, c_next, slope, status


def tabdiff_heun(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next):
    """tabdiff_heun backend: ``(x_num_next [B, n], status [3])``."""
    B, n = x_num_hat.shape
    out = torch.empty(B, n, dtype=x_num_hat.dtype, device=x_num_hat.device)
    status = _status(x_num_hat)
    if B and n:
        br, bc, nw = _tile(x_num_hat, B, n)
        _launch(_heun_kernel, (triton.cdiv(B, br),),
                (x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next, out, status), x_num_hat,
                B, n, *x_num_hat.stride(), *x_next.stride(), *denoised_next.stride(), *d.stride(), BLOCK_R=br,
                BLOCK_C=bc, num_warps=nw)
    return out, status


def tabdiff_observe(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance,
                    num_classes, seed, step, row_start, noise, uniforms):
    """tabdiff_observe backend: ``(x_num [B, n], x_cat [B, m], status [3])``."""
    (B, n), m = z_num.shape, z_cat.shape[1]
    out_num, out_cat, status = _outputs(z_num, m)
    if B and (n or m):
        k, _ = _class_tables(tuple(num_classes), z_num.device)
        br, bc, nw = _tile(z_num, B, max(n, m))
        num_missing, cat_missing = num_missing.view(torch.uint8), cat_missing.view(torch.uint8)
        _launch(_observe_kernel, (triton.cdiv(B, br),),
                (z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance, k, noise,
                 uniforms, out_num, out_cat, status), z_num,
                B, n, m, *z_num.stride(), *z_cat.stride(), *x_obs_num.stride(), *x_obs_cat.stride(),
                *num_missing.stride(), *cat_missing.stride(), *_strides(noise), *_strides(uniforms), seed, step,
                row_start, GIVEN_NOISE=noise is not None, GIVEN_UNIFORMS=uniforms is not None, BLOCK_R=br,
                BLOCK_C=bc, num_warps=nw)
    return out_num, out_cat, status
