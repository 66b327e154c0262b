"""Benchmark cases for the Chebyshev family at Spectrum-realistic shapes.

Default: a FLUX 1024^2 last-block feature, N = 4096 x 3072, K = 14 recorded steps (the
flex_window = 0.75 schedule), degree 4, S in {1, 2} streams, fp32 and bf16 storage. Compared:

* ``reference``                 - the reference backend through the public op;
* ``torch.compile(reference)``  - inductor over the same plain-torch functions;
* ``official-style``            - what the official Spectrum code does per forecast: stack the
  history, upcast it to fp32, Cholesky-solve the normal equations, keep bf16 coefficients,
  evaluate in bf16 (``hanjq17/Spectrum`` ``BaseForecaster``, re-implemented here);
* ``cpu``                       - the C++ backend (one pass over the snapshots).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .. import ops
from .._dispatch import use_backend
from ..ops import chebyshev as cheb
from .harness import Case

DEGREE, LAM, T_RANGE = 4, 0.1, (0.0, 50.0)
SPECTRUM_STEPS_A075 = [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]


def _official_basis(t: torch.Tensor) -> torch.Tensor:
    return cheb.chebyshev_basis(2 * (t - T_RANGE[0]) / (T_RANGE[1] - T_RANGE[0]) - 1, DEGREE)


def official_style_fit(snapshots: list[torch.Tensor], times: list[float]) -> torch.Tensor:
    """One stream, the official way: [K, N] stack -> fp32 copy -> Cholesky solve -> fp32 [P, N]."""
    H = torch.stack(snapshots, dim=0).float()                                   # copy + upcast
    X = _official_basis(torch.tensor(times, dtype=torch.float32))
    L = torch.linalg.cholesky(X.T @ X + LAM * torch.eye(DEGREE + 1))
    return torch.cholesky_solve(X.T @ H, L)


def official_style_forecast(snapshots: list[torch.Tensor], times: list[float], t_query: float) -> torch.Tensor:
    """The official forecast: refit, keep bf16 coefficients, evaluate in bf16 -> [1, N]."""
    C = official_style_fit(snapshots, times).to(torch.bfloat16)
    x_star = _official_basis(torch.tensor([t_query], dtype=torch.float32)).to(torch.bfloat16)
    return (x_star @ C).to(snapshots[0].dtype)


def _via(backend: str, fn, *args, **kwargs):
    def call():
        with use_backend(backend):
            return fn(*args, **kwargs)
    return call


def cases(quick: bool) -> Iterator[Case]:
    N = 256 * 3072 if quick else 4096 * 3072
    streams = (1,) if quick else (1, 2)
    times_list = [float(t) for t in SPECTRUM_STEPS_A075]
    K, P = len(times_list), DEGREE + 1
    t_star = 47.0
    for dtype in (torch.float32, torch.bfloat16):
        for S in streams:
            gen = torch.Generator().manual_seed(0)
            feats = torch.randn(S, K, N, generator=gen).to(dtype)
            times = torch.tensor(times_list, dtype=torch.float64)
            t_query = torch.tensor([t_star], dtype=torch.float64)
            esize = feats.element_size()
            shape = f"S={S} K={K} N={N} {str(dtype).replace('torch.', '')}"
            ref_args = (times.expand(S, K), feats, t_query.expand(S, 1), DEGREE, LAM, *T_RANGE, 1.0, True, dtype)
            compiled = torch.compile(cheb.forecast_reference, dynamic=False)
            snapshots = [[feats[s, k] for k in range(K)] for s in range(S)]
            yield Case(
                op="chebyshev_forecast", label=shape,
                impls={
                    "reference": _via("reference", ops.chebyshev_forecast, times, feats, t_query),
                    "torch.compile(reference)": lambda: compiled(*ref_args),
                    "official-style": lambda: torch.stack(
                        [official_style_forecast(snapshots[s], times_list, t_star) for s in range(S)]),
                    "cpu": _via("cpu", ops.chebyshev_forecast, times, feats, t_query),
                },
                bytes_moved=S * K * N * esize + S * N * esize, elements=S * K * N)
            if S != 1:
                continue
            compiled_fit = torch.compile(cheb.fit_reference, dynamic=False)
            yield Case(
                op="chebyshev_fit", label=shape,
                impls={
                    "reference": _via("reference", ops.chebyshev_fit, times, feats),
                    "torch.compile(reference)": lambda: compiled_fit(times.expand(S, K), feats, DEGREE, LAM,
                                                                     *T_RANGE, True),
                    "official-style": lambda: official_style_fit(snapshots[0], times_list).unsqueeze(0),
                    "cpu": _via("cpu", ops.chebyshev_fit, times, feats),
                },
                bytes_moved=S * K * N * esize + S * P * N * 4, elements=S * K * N)
            coeffs = ops.chebyshev_fit(times, feats)
            compiled_eval = torch.compile(cheb.eval_reference, dynamic=False)
            yield Case(
                op="chebyshev_eval", label=f"S={S} P={P} Q=1 N={N} fp32 coeffs -> {str(dtype).replace('torch.', '')}",
                impls={
                    "reference": _via("reference", ops.chebyshev_eval, coeffs, t_query, out_dtype=dtype),
                    "torch.compile(reference)": lambda: compiled_eval(coeffs, t_query.expand(S, 1), DEGREE,
                                                                      *T_RANGE, dtype),
                    "cpu": _via("cpu", ops.chebyshev_eval, coeffs, t_query, out_dtype=dtype),
                },
                bytes_moved=S * P * N * 4 + S * N * esize, elements=S * P * N)
