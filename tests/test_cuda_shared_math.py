"""The CUDA Chebyshev kernel runs the shared, torch-free per-element math.

No GPU here, so the kernel cannot be run. Instead:

* a source check that csrc/cuda/chebyshev_kernels.cu takes its per-element math from
  csrc/include/diffkern (``cheb::combine_step`` for the fp32 FMA accumulation, ``to_float`` /
  ``from_float<T>`` for the element conversions) and does not re-implement it. That header math
  is what the CPU backend runs too, so the CPU tests (tests/test_chebyshev.py) exercise it. (The
  header's ``#ifdef __CUDA_ARCH__`` f16/bf16 conversions are single ``cvt.rn`` instructions with
  the same round-to-nearest-even values as the host paths; only NaN payloads may differ.)
* a ``@pytest.mark.cuda`` comparison of the cuda backend with the reference, auto-skipped on
  machines without a CUDA device (tests/conftest.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import diffkern
from diffkern import ops

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "chebyshev_kernels.cu"


def _code(path: Path) -> str:
    """Source without comments or string literals."""
    text = path.read_text()
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def test_kernel_uses_shared_header_math():
    code = _code(KERNEL)
    assert re.search(r'#\s*include\s*"diffkern/chebyshev\.h"', KERNEL.read_text())
    assert re.search(r"\bcheb::combine_step\s*<", code), "accumulate through cheb::combine_step<QB>"
    assert re.search(r"\bto_float\s*\(", code), "convert inputs with diffkern::to_float"
    assert re.search(r"\bfrom_float\s*<", code), "convert outputs with diffkern::from_float<T>"


def test_kernel_does_not_reimplement_element_math():
    code = _code(KERNEL)
    forbidden = {
        r"\bfmaf?\s*\(|__fmaf?_r[nzdu]|__fadd|__fmul": "FMA/arithmetic intrinsics (use cheb::combine_step)",
        r"__half|__nv_bfloat16|__float2half|__half2float|__float2bfloat16|__bfloat162float|cuda_fp16|cuda_bf16":
            "fp16/bf16 intrinsics (use to_float/from_float)",
        r"\bcvt\.|asm\s*\(": "inline PTX conversions (they belong in csrc/include/diffkern/common.h)",
        r"0x7f800000|0x7fff|0x7c00|0x8000u?\b|<<\s*16|>>\s*16|<<\s*13|>>\s*13": "hand-rolled float bit twiddling",
        r"\bbits_to_float\b|\bfloat_to_bits\b": "conversion internals",
    }
    found = {why: re.findall(pattern, code) for pattern, why in forbidden.items()}
    found = {why: hits for why, hits in found.items() if hits}
    assert not found, f"chebyshev_kernels.cu re-implements per-element math: {found}"


# ---- on a GPU --------------------------------------------------------------------------------

def _reference_and_cuda(fn, *args, **kwargs):
    with diffkern.use_backend("reference"):
        want = fn(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    with diffkern.use_backend("cuda"):
        got = fn(*[a.cuda() if isinstance(a, torch.Tensor) else a for a in args], **kwargs)
    return got, want


def _check(got: torch.Tensor, want: torch.Tensor, scale: float) -> None:
    assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape
    g, w = got.cpu().double(), want.double()
    tol = 2e-5 * max(scale, 1e-3) + (torch.finfo(want.dtype).eps * torch.maximum(g.abs(), w.abs())
                                     if want.dtype in (torch.float16, torch.bfloat16) else 0.0)
    err = (g - w).abs()
    assert bool((err <= tol).all()), f"worst error {float(err.max()):.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N", [4096, 1031], ids=["N4096-vector", "N1031-scalar"])
def test_cuda_matches_reference(dtype, N):
    gen = torch.Generator().manual_seed(0)
    S, K, Q, degree = 3, 9, 7, 4                      # Q = 7: one full q-block of 4 and a ragged 3
    times = torch.linspace(0.0, 40.0, K, dtype=torch.float64)
    feats = torch.randn(S, K, N, generator=gen).to(dtype)
    t_query = torch.tensor([41.0, 42.5, 44.0, 45.0, 46.0, 47.5, 49.0], dtype=torch.float64)[:Q]
    scale = float(feats.double().abs().max()) * 8

    got, want = _reference_and_cuda(ops.chebyshev_forecast, times, feats, t_query, degree=degree, blend=0.7)
    _check(got, want, scale)
    got, want = _reference_and_cuda(ops.chebyshev_fit, times, feats, degree=degree)
    _check(got, want, scale)
    coeffs = torch.randn(S, degree + 1, N, generator=gen).to(dtype)
    got, want = _reference_and_cuda(ops.chebyshev_eval, coeffs, t_query, out_dtype=torch.float32)
    _check(got, want, scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_cuda_strided_history_view(dtype, offset):
    """feats as a view of a preallocated [S, K_max, N + 1] history buffer: strided S/K, unit N."""
    gen = torch.Generator().manual_seed(1)
    S, K_max, K, N = 2, 12, 6, 2048
    buffer = torch.randn(S, K_max, N + 1, generator=gen).to(dtype)
    feats = buffer[:, 2:2 + K, offset:offset + N]
    assert feats.stride(-1) == 1 and not feats.is_contiguous()
    times = torch.linspace(0.0, 30.0, K, dtype=torch.float64)
    t_query = torch.tensor([33.0, 36.0], dtype=torch.float64)
    with diffkern.use_backend("reference"):
        want = ops.chebyshev_forecast(times, feats, t_query, degree=3)
    with diffkern.use_backend("cuda"):
        got = ops.chebyshev_forecast(times.cuda(), buffer.cuda()[:, 2:2 + K, offset:offset + N],
                                     t_query.cuda(), degree=3)
    _check(got, want, float(feats.double().abs().max()) * 8)
