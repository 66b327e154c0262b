"""The counter-based random stream every diffkern operator draws from (torch side).

One stream, three implementations that give the same bits: this module (torch, any device),
``csrc/include/diffkern/philox.h`` (torch-free C++/CUDA) and ``kernels/philox.py`` (Triton).
A random number is a pure function of its key, so a sampler's output depends only on
``(seed, offset, tag, row, column)``, never on batch sizes, launch order or thread count.

Philox-4x32-10 (Salmon et al. 2011; the round structure of Random123 and ``tl.philox``):

* key     = the 64-bit ``seed``;
* counter = ``(column, row, offset_lo32, offset_hi28 | tag << 28)``: ``row`` and ``column``
  are 32-bit indices into the caller's grid, ``offset`` (< 2^60) advances a stream between
  calls (a decoding window, a sampler step), and ``tag`` (< 16) names the purpose, so
  streams of different purposes never overlap. Tags are registered in :data:`TAGS`.

Derived variates (all float64):

* uniform ``u = (2 m + 1) 2^-53`` with ``m = (x1 >> 12) << 32 | x0``: exact, never 0 or 1;
* normal: Box-Muller on the two uniforms of the counter's word pairs ``(x0, x1)`` and
  ``(x2, x3)``, ``sqrt(-2 ln u_a) cos(2 pi u_b)`` (one normal per counter).

Uniforms are bit-identical in all three; normals agree to the last bits of the platform's log and
cos. :func:`uniforms` / :func:`normals` are the spec; :func:`fast_uniforms` / :func:`fast_normals`
return the same grids computed by the C++ op on CPU (``torch.ops.diffkern.philox_uniforms``) and
the Triton helper on CUDA, where those are available.
"""

from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from .. import _dispatch

__all__ = ["TAGS", "philox4x32_10", "uniform", "normal", "uniforms", "normals", "fast_uniforms", "fast_normals"]

# Purpose tags, one per stream; a new family appends its own (4 bits: at most 15 purposes).
TAGS = {
    "poe_draft": 1, "poe_accept": 2, "poe_residual": 3,
    "tabdiff_churn": 4, "tabdiff_remask": 5, "tabdiff_unmask": 6, "tabdiff_observed": 7,
}
MAX_OFFSET = 1 << 60

_M32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a * b for a constant a < 2^32 and uint32 lanes b (no overflow)."""
    x = a * (b >> 16)              # < 2^48
    y = a * (b & 0xFFFF)           # < 2^48
    hi = (x + (y >> 16)) >> 16
    lo = (((x & 0xFFFF) << 16) + y) & _M32
    return hi & _M32, lo


def philox4x32_10(seed: int, c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor):
    """The four output words (int64 tensors holding uint32) of Philox-4x32-10 at key ``seed``."""
    seed &= (1 << 64) - 1
    k0, k1 = seed & _M32, seed >> 32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
    return c0, c1, c2, c3


def _words(seed: int, offset: int, tag: int, row: Tensor, col: Tensor):
    if not 0 <= tag < 16:
        raise ValueError(f"tag: expected 0 <= tag < 16, got {tag}")
    if not 0 <= offset < MAX_OFFSET:
        raise ValueError(f"offset: expected 0 <= offset < 2**60, got {offset}")
    row, col = torch.broadcast_tensors(row.long(), col.long())
    c2 = torch.full_like(row, offset & _M32)
    c3 = torch.full_like(row, ((offset >> 32) & 0x0FFFFFFF) | (tag << 28))
    return philox4x32_10(seed, col & _M32, row & _M32, c2, c3)


def _to_unit(lo: Tensor, hi: Tensor) -> Tensor:
    m = ((hi >> 12) << 32) | lo
    return (2 * m + 1).to(torch.float64) * 2.0 ** -53


def uniform(seed: int, offset: int, tag: int, row: Tensor, col: Tensor) -> Tensor:
    """Float64 uniforms in (0, 1) at the (broadcast) integer index tensors ``row`` and ``col``."""
    x0, x1, _, _ = _words(seed, offset, tag, row, col)
    return _to_unit(x0, x1)


def normal(seed: int, offset: int, tag: int, row: Tensor, col: Tensor) -> Tensor:
    """Float64 standard normals at the (broadcast) integer index tensors ``row`` and ``col``."""
    x0, x1, x2, x3 = _words(seed, offset, tag, row, col)
    u_a, u_b = _to_unit(x0, x1), _to_unit(x2, x3)
    return torch.sqrt(-2.0 * torch.log(u_a)) * torch.cos(2.0 * math.pi * u_b)


def _grid(rows: int, cols: int, row_start: int, device) -> tuple[Tensor, Tensor]:
    r = torch.arange(row_start, row_start + rows, dtype=torch.int64, device=device).view(-1, 1)
    c = torch.arange(cols, dtype=torch.int64, device=device).view(1, -1)
    return r, c


def uniforms(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
             device: Union[str, torch.device] = "cpu") -> Tensor:
    """``[rows, cols]`` float64 uniforms of rows ``row_start ..`` and columns ``0 .. cols-1``."""
    return uniform(seed, offset, tag, *_grid(rows, cols, row_start, device))


def normals(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
            device: Union[str, torch.device] = "cpu") -> Tensor:
    """``[rows, cols]`` float64 standard normals of rows ``row_start ..`` and columns ``0 ..``."""
    return normal(seed, offset, tag, *_grid(rows, cols, row_start, device))


def _fast(variate: str, seed: int, offset: int, tag: int, rows: int, cols: int, row_start: int, device) -> Tensor:
    device = torch.device(device)
    if device.type == "cpu" and _dispatch.has_compiled(f"philox_{variate}"):
        signed_seed = seed - 2 ** 64 if seed >= 2 ** 63 else seed   # the op's int64 carries the uint64's bits
        return getattr(torch.ops.diffkern, f"philox_{variate}")(signed_seed, offset, tag, rows, cols, row_start)
    if device.type == "cuda" and _dispatch.backends()["triton"]:
        from ..kernels import philox as kphilox
        return getattr(kphilox, variate)(seed, offset, tag, rows, cols, row_start=row_start, device=device)
    spec = uniforms if variate == "uniforms" else normals
    return spec(seed, offset, tag, rows, cols, row_start=row_start, device=device)


def fast_uniforms(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
                  device: Union[str, torch.device] = "cpu") -> Tensor:
    """:func:`uniforms` (the same bits), computed by the compiled C++ op on CPU and by the Triton
    helper on CUDA when available, else by :func:`uniforms` itself."""
    return _fast("uniforms", seed, offset, tag, rows, cols, row_start, device)


def fast_normals(seed: int, offset: int, tag: int, rows: int, cols: int, *, row_start: int = 0,
                 device: Union[str, torch.device] = "cpu") -> Tensor:
    """:func:`normals` computed like :func:`fast_uniforms` (equal to the last bits of libm)."""
    return _fast("normals", seed, offset, tag, rows, cols, row_start, device)
