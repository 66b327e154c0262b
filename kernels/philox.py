"""Triton side of diffkern's counter-based random stream: the same bits as
``diffkern.ops.philox`` (the torch spec) and ``csrc/include/diffkern/philox.h`` (C++).

``@triton.jit`` helpers, for kernels that draw their noise in-kernel::

    u = uniform(seed, offset, tag, row, col)   # float64 in (0, 1)
    z = normal(seed, offset, tag, row, col)    # float64 standard normal (Box-Muller)

``seed`` (a uint64 < 2^64, or the int64 with its bits: negative for seeds >= 2^63, as diffkern's
op schemas carry it; ``.to(tl.uint64)`` reinterprets the bits, sign-extending an int32-typed small
negative one, so both spellings give one key), ``offset`` (< 2^60) and ``tag`` (< 16) are scalars,
``row`` and ``col`` integer tensors of one shape. Key = seed; counter = (col, row, offset_lo32, offset_hi28 | tag << 28); the
round function is Random123's Philox-4x32-10 (that of ``tl.philox``), written out here so it can
be read against the spec. ``uniforms`` / ``normals`` fill a ``[rows, cols]`` grid with them (what
``diffkern.ops.philox.fast_uniforms`` runs on CUDA tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["uniform", "normal", "uniforms", "normals"]

@triton.jit
def _words(seed, offset, tag, row, col):
    """The four uint32 Philox-4x32-10 output words at (seed, offset, tag, row, col)."""
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    seed = tl.to_tensor(seed).to(tl.uint64)
    offset = tl.to_tensor(offset).to(tl.uint64)
    tag = tl.to_tensor(tag).to(tl.uint64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = col.to(tl.uint32)
    c1 = row.to(tl.uint32)
    c2 = tl.zeros_like(c0) + (offset & 0xFFFFFFFF).to(tl.uint32)
    c3 = tl.zeros_like(c0) + (((offset >> 32) & 0x0FFFFFFF) | (tag << 28)).to(tl.uint32)
    for _ in tl.static_range(10):
        n0 = tl.umulhi(ROUND_B, c2) ^ c1 ^ k0
        n2 = tl.umulhi(ROUND_A, c0) ^ c3 ^ k1
        c1 = tl.mul(ROUND_B, c2, sanitize_overflow=False)
        c3 = tl.mul(ROUND_A, c0, sanitize_overflow=False)
        c0 = n0
        c2 = n2
        k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, KEY_B, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _to_unit(lo, hi):
    """(2 m + 1) 2^-53 with m = (hi >> 12) << 32 | lo: exact in float64, in (0, 1)."""
    m = ((hi >> 12).to(tl.uint64) << 32) | lo.to(tl.uint64)
    return (2 * m + 1).to(tl.float64) * 1.1102230246251565e-16


@triton.jit
def uniform(seed, offset, tag, row, col):
    x0, x1, _, _ = _words(seed, offset, tag, row, col)
    return _to_unit(x0, x1)


@triton.jit
def normal(seed, offset, tag, row, col):
    x0, x1, x2, x3 = _words(seed, offset, tag, row, col)
    u_a = _to_unit(x0, x1)
    u_b = _to_unit(x2, x3)
    return tl.sqrt(-2.0 * tl.log(u_a)) * tl.cos(6.283185307179586 * u_b)   # 2 pi, as the spec's 2.0 * math.pi


@triton.jit(do_not_specialize=["seed", "offset", "tag", "row_start"])
def _fill_kernel(out_ptr, seed, offset, tag, total, cols, row_start, NORMAL: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < total
    row = row_start + i // cols
    col = i % cols
    if NORMAL:
        v = normal(seed, offset, tag, row, col)
    else:
        v = uniform(seed, offset, tag, row, col)
    tl.store(out_ptr + i, v, mask=mask)


def _fill(normal_: bool, seed: int, offset: int, tag: int, rows: int, cols: int, row_start: int, device):
    out = torch.empty(rows, cols, dtype=torch.float64, device=device)
    total = rows * cols
    if total:
        block = 1024
        _fill_kernel[(triton.cdiv(total, block),)](out, seed, offset, tag, total, max(cols, 1), row_start,
                                                   NORMAL=normal_, BLOCK=block)
    return out


def uniforms(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
             device="cuda") -> torch.Tensor:
    """``[rows, cols]`` float64 uniforms of rows ``row_start ..`` (``diffkern.ops.philox.uniforms``)."""
    return _fill(False, seed, offset, tag, rows, cols, row_start, device)


def normals(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
            device="cuda") -> torch.Tensor:
    """``[rows, cols]`` float64 standard normals (``diffkern.ops.philox.normals``)."""
    return _fill(True, seed, offset, tag, rows, cols, row_start, device)
