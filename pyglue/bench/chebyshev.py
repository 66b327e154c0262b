"""Benchmark cases for the Chebyshev family at Spectrum-realistic shapes.

Default: a FLUX 1024^2 last-block feature, N = 4096 x 3072, K = 14 recorded steps (the
flex_window = 0.75 schedule), degree 4, S in {1, 2} streams, fp32 and bf16 storage. Compared:

* ``reference``                 - the reference backend through the public op;
* ``torch.compile(reference)``  - inductor over the same plain-torch functions;
* ``official-style``            - what the official Spectrum code does per forecast: stack the
  history, upcast it to fp32, Cholesky-solve the normal equations, keep bf16 coefficients,
  evaluate in bf16 (``hanjq17/Spectrum`` ``BaseForecaster``, re-implemented here);
* the compiled backends the op registers for the device (``cpu``; ``cuda`` on a GPU).
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

from .. import ops
from .._dispatch import use_backend
from ..ops import chebyshev as cheb
from .harness import Case, CasePlan, compile_lazily, fast_backends, with_backends

DEGREE, LAM, T_RANGE = 4, 0.1, (0.0, 50.0)
SPECTRUM_STEPS_A075 = [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]
T_STAR = 47.0
PLAIN_TORCH = ("reference", "torch.compile(reference)")


def _official_basis(t: torch.Tensor) -> torch.Tensor:
    return cheb.chebyshev_basis(2 * (t - T_RANGE[0]) / (T_RANGE[1] - T_RANGE[0]) - 1, DEGREE)


def official_style_fit(snapshots: list[torch.Tensor], times: list[float]) -> torch.Tensor:
    """One stream, the official way: [K, N] stack -> fp32 copy -> Cholesky solve -> fp32 [P, N]."""
    H = torch.stack(snapshots, dim=0).float()                                   # copy + upcast
    X = _official_basis(torch.tensor(times, dtype=torch.float32, device=H.device))
    L = torch.linalg.cholesky(X.T @ X + LAM * torch.eye(DEGREE + 1, device=H.device))
    return torch.cholesky_solve(X.T @ H, L)


def official_style_forecast(snapshots: list[torch.Tensor], times: list[float], t_query: float) -> torch.Tensor:
    """The official forecast: refit, keep bf16 coefficients, evaluate in bf16 -> [1, N]."""
    C = official_style_fit(snapshots, times).to(torch.bfloat16)
    x_star = _official_basis(torch.tensor([t_query], dtype=torch.float32, device=C.device)).to(torch.bfloat16)
    return (x_star @ C).to(snapshots[0].dtype)


def _via(backend: str, fn, *args, **kwargs):
    def call():
        with use_backend(backend):
            return fn(*args, **kwargs)
    return call


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _inputs(S: int, N: int, dtype: torch.dtype, device: str):
    """Seeded snapshots [S, K, N] (made on the CPU, so every device times the same numbers),
    their float64 times [K] and the query time [1], all on ``device``."""
    K = len(SPECTRUM_STEPS_A075)
    feats = torch.randn(S, K, N, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    times = torch.tensor([float(t) for t in SPECTRUM_STEPS_A075], dtype=torch.float64, device=device)
    t_query = torch.tensor([T_STAR], dtype=torch.float64, device=device)
    return times, feats, t_query


def _forecast_case(S: int, N: int, dtype: torch.dtype, device: str, label: str) -> Case:
    times, feats, t_query = _inputs(S, N, dtype, device)
    K = feats.shape[1]
    esize = feats.element_size()
    ref_args = (times.expand(S, K), feats, t_query.expand(S, 1), DEGREE, LAM, *T_RANGE, 1.0, True, dtype)
    compiled = compile_lazily(cheb.forecast_reference, dynamic=False)
    snapshots = [[feats[s, k] for k in range(K)] for s in range(S)]
    times_list = times.tolist()
    impls, skipped = with_backends("chebyshev_forecast", device, {
        "reference": _via("reference", ops.chebyshev_forecast, times, feats, t_query),
        "torch.compile(reference)": lambda: compiled(*ref_args),
        "official-style": lambda: torch.stack(
            [official_style_forecast(snapshots[s], times_list, T_STAR) for s in range(S)]),
    }, lambda b: _via(b, ops.chebyshev_forecast, times, feats, t_query))
    return Case(op="chebyshev_forecast", label=label, impls=impls, skipped=skipped,
                bytes_moved=S * K * N * esize + S * N * esize, elements=S * K * N)


def _fit_case(N: int, dtype: torch.dtype, device: str, label: str) -> Case:
    S, P = 1, DEGREE + 1
    times, feats, _ = _inputs(S, N, dtype, device)
    K = feats.shape[1]
    compiled = compile_lazily(cheb.fit_reference, dynamic=False)
    snapshots = [feats[0, k] for k in range(K)]
    times_list = times.tolist()
    impls, skipped = with_backends("chebyshev_fit", device, {
        "reference": _via("reference", ops.chebyshev_fit, times, feats),
        "torch.compile(reference)": lambda: compiled(times.expand(S, K), feats, DEGREE, LAM, *T_RANGE, True),
        "official-style": lambda: official_style_fit(snapshots, times_list).unsqueeze(0),
    }, lambda b: _via(b, ops.chebyshev_fit, times, feats))
    return Case(op="chebyshev_fit", label=label, impls=impls, skipped=skipped,
                bytes_moved=S * K * N * feats.element_size() + S * P * N * 4, elements=S * K * N)


def _eval_case(N: int, dtype: torch.dtype, device: str, label: str) -> Case:
    S, P = 1, DEGREE + 1
    times, feats, t_query = _inputs(S, N, dtype, device)
    coeffs = ops.chebyshev_fit(times, feats)
    esize = feats.element_size()
    del feats                                   # only the coefficients are read
    compiled = compile_lazily(cheb.eval_reference, dynamic=False)
    impls, skipped = with_backends("chebyshev_eval", device, {
        "reference": _via("reference", ops.chebyshev_eval, coeffs, t_query, out_dtype=dtype),
        "torch.compile(reference)": lambda: compiled(coeffs, t_query.expand(S, 1), DEGREE, *T_RANGE, dtype),
    }, lambda b: _via(b, ops.chebyshev_eval, coeffs, t_query, out_dtype=dtype))
    return Case(op="chebyshev_eval", label=label, impls=impls, skipped=skipped,
                bytes_moved=S * P * N * 4 + S * N * esize, elements=S * P * N)


def plan(quick: bool, device: str = "cpu") -> Iterator[CasePlan]:
    N = 256 * 3072 if quick else 4096 * 3072
    K, P = len(SPECTRUM_STEPS_A075), DEGREE + 1
    for dtype in (torch.float32, torch.bfloat16):
        for S in ((1,) if quick else (1, 2)):
            shape = f"S={S} K={K} N={N} {_dtype_name(dtype)}"
            yield CasePlan("chebyshev_forecast", shape,
                           (*PLAIN_TORCH, "official-style", *fast_backends("chebyshev_forecast", device)),
                           functools.partial(_forecast_case, S, N, dtype, device, shape))
            if S != 1:
                continue
            yield CasePlan("chebyshev_fit", shape,
                           (*PLAIN_TORCH, "official-style", *fast_backends("chebyshev_fit", device)),
                           functools.partial(_fit_case, N, dtype, device, shape))
            label = f"S={S} P={P} Q=1 N={N} fp32 coeffs -> {_dtype_name(dtype)}"
            yield CasePlan("chebyshev_eval", label, (*PLAIN_TORCH, *fast_backends("chebyshev_eval", device)),
                           functools.partial(_eval_case, N, dtype, device, label))
