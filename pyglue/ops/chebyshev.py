"""Chebyshev operator family: ridge-regressed Chebyshev series in time (Spectrum's forecaster).

Math (shared by every backend; ``P = degree + 1``)::

    tau      = 2 (t - t_min) / (t_max - t_min) - 1
    basis    T_0 = 1, T_1 = tau, T_p = 2 tau T_{p-1} - T_{p-2}
    X [K, P] = basis at the K fit times of a stream
    C        = (X^T X + lam D)^-1 X^T F        D = I, or I with D[0,0] = 0 (penalize_intercept=False)
    eval     = basis(tau_q) . C
    forecast = blend * eval(fit(F))(t*) + (1 - blend) * (h_K + k (h_K - h_{K-1})),
               k = (t* - t_K) / (t_K - t_{K-1})

Every output row is a weighted sum of input rows along one axis: ``fit`` weights the K snapshots
with ``(X^T X + lam D)^-1 X^T`` [P, K], ``eval`` weights the P coefficients with the basis [Q, P]
and ``forecast`` weights the K snapshots with ``basis(tau_q) (X^T X + lam D)^-1 X^T`` (+ Taylor)
[Q, K]. The fast backends therefore solve the tiny P x P system on the host in fp64 and run one
bandwidth-bound *snapshot combination* ``out[s, q] = sum_k W[s, q, k] feats[s, k]`` (fp32
accumulation): a forecast never materialises coefficients and reads ``feats`` exactly once.

Backends: ``reference`` (this file, plain torch: the spec), ``cpu`` (``csrc/cpu/chebyshev.cpp``),
``cuda`` (``csrc/cuda/chebyshev_kernels.cu``). The weight solve is ``csrc/include/diffkern/
chebyshev.h``, used by both compiled backends.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _extension
from .._dispatch import Operator
from . import _checks
from ._checks import FAST_DTYPES

__all__ = ["chebyshev_fit", "chebyshev_eval", "chebyshev_forecast", "chebyshev_basis"]
MAX_DEGREE = 30  # the compiled weight solve keeps P x P matrices on the stack


# --------------------------------------------------------------------------------------------
# Reference backend (plain torch; the spec)
# --------------------------------------------------------------------------------------------

def chebyshev_basis(tau: Tensor, degree: int) -> Tensor:
    """``[..., degree + 1]`` Chebyshev polynomials T_0..T_degree at ``tau`` (recurrence)."""
    columns = [torch.ones_like(tau)]
    if degree >= 1:
        columns.append(tau)
    for _ in range(2, degree + 1):
        columns.append(2 * tau * columns[-1] - columns[-2])
    return torch.stack(columns, dim=-1)


def _tau(t: Tensor, t_min: float, t_max: float) -> Tensor:
    return 2.0 * (t.to(torch.float64) - t_min) / (t_max - t_min) - 1.0


def _normal_equations(times: Tensor, degree: int, lam: float, t_min: float, t_max: float,
                      penalize_intercept: bool) -> tuple[Tensor, Tensor]:
    """The basis X [S, K, P] at the fit times and G = X^T X + lam D [S, P, P], in float64."""
    X = chebyshev_basis(_tau(times, t_min, t_max), degree)
    penalty = torch.ones(degree + 1, dtype=torch.float64, device=X.device)
    if not penalize_intercept:
        penalty[0] = 0.0
    return X, X.transpose(-1, -2) @ X + lam * torch.diag(penalty)


def _ridge_operator(times: Tensor, degree: int, lam: float, t_min: float, t_max: float,
                    penalize_intercept: bool) -> Tensor:
    """``(X^T X + lam D)^-1 X^T`` per stream, [S, P, K] in float64."""
    X, G = _normal_equations(times, degree, lam, t_min, t_max, penalize_intercept)
    return torch.linalg.solve(G, X.transpose(-1, -2))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fit_reference(times, feats, degree, lam, t_min, t_max, penalize_intercept):
    A = _ridge_operator(times, degree, lam, t_min, t_max, penalize_intercept)
    compute = _compute_dtype(feats.dtype)
    return A.to(compute) @ feats.to(compute)                            # [S, P, N]


def eval_reference(coeffs, t_query, degree, t_min, t_max, out_dtype):
    B = chebyshev_basis(_tau(t_query, t_min, t_max), degree)            # [S, Q, P]
    compute = _compute_dtype(coeffs.dtype)
    return (B.to(compute) @ coeffs.to(compute)).to(out_dtype)


def forecast_reference(times, feats, t_query, degree, lam, t_min, t_max, blend,
                       penalize_intercept, out_dtype):
    coeffs = fit_reference(times, feats, degree, lam, t_min, t_max, penalize_intercept)
    cheb = eval_reference(coeffs, t_query, degree, t_min, t_max, coeffs.dtype)
    if blend == 1.0:
        return cheb.to(out_dtype)
    compute = cheb.dtype
    h_last, h_prev = feats[:, -1:].to(compute), feats[:, -2:-1].to(compute)         # [S, 1, N]
    t_last, t_prev = times[:, -1:].to(torch.float64), times[:, -2:-1].to(torch.float64)
    k = ((t_query.to(torch.float64) - t_last) / (t_last - t_prev)).to(compute)      # [S, Q]
    taylor = h_last + k.unsqueeze(-1) * (h_last - h_prev)
    return (blend * cheb + (1.0 - blend) * taylor).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Value checks (run inside the ops, on every backend, before any math)
# --------------------------------------------------------------------------------------------

MAX_CONDITION = 1e14  # fp64 weights keep ~1e-2 relative accuracy up to here; beyond, every backend refuses


def _check_conditioning(host_times: Tensor, degree: int, lam: float, t_min: float, t_max: float,
                        penalize_intercept: bool) -> None:
    """Refuse numerically singular ridge systems on every backend alike (the same calls)."""
    _, G = _normal_equations(host_times, degree, lam, t_min, t_max, penalize_intercept)
    eig = torch.linalg.eigvalsh(G)  # [S, P] ascending
    worst = (eig[:, -1] / eig[:, 0].clamp_min(0.0)).max().item()
    if not worst <= MAX_CONDITION:
        raise ValueError(f"times: the ridge normal equations are numerically singular (condition number "
                         f"{worst:.2g} > {MAX_CONDITION:.0g}; lam={lam}, degree={degree}, K={host_times.shape[1]}, "
                         f"t_range=({t_min}, {t_max})); use a larger lam, a lower degree or more distinct times")


def _check_times(times: Tensor, degree: int, lam: float, blend: float, t_min: float, t_max: float,
                 penalize_intercept: bool) -> None:
    host = times.detach().to("cpu", torch.float64)
    if not torch.isfinite(host).all():
        raise ValueError("times: contains NaN or infinite values")
    sorted_times = host.sort(dim=-1).values
    has_duplicates = bool((sorted_times[:, 1:] == sorted_times[:, :-1]).any()) if host.shape[1] > 1 else False
    if lam == 0.0:
        if has_duplicates:
            raise ValueError("times: duplicate time values with lam=0 make the least-squares system "
                             "singular or ill-posed; use distinct times or lam > 0")
        if host.shape[1] < degree + 1:
            raise ValueError(f"times: lam=0 needs at least degree+1={degree + 1} distinct times per "
                             f"stream for a non-singular system, got K={host.shape[1]}; lower degree "
                             "or use lam > 0")
    _check_conditioning(host, degree, lam, t_min, t_max, penalize_intercept)
    if blend != 1.0 and bool((host[:, -1] == host[:, -2]).any()):
        raise ValueError("times: the last two times of a stream coincide, so the Taylor term of "
                         "blend < 1 (slope over the last two snapshots) is undefined")


def _check_query(t_query: Tensor) -> None:
    if not torch.isfinite(t_query.detach()).all():
        raise ValueError("t_query: contains NaN or infinite values")


# --------------------------------------------------------------------------------------------
# Compiled backends: host fp64 weights (csrc/include/diffkern/chebyshev.h) + snapshot combination
# --------------------------------------------------------------------------------------------

def _host(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64).contiguous()


def _unit_stride_last(x: Tensor) -> Tensor:
    # The kernels walk N with unit stride; S and K may have any stride (history-buffer views).
    return x if x.stride(-1) == 1 else x.contiguous()


def _combine(weights: Tensor, feats: Tensor, out_dtype: torch.dtype) -> Tensor:
    weights = weights.to(device=feats.device, dtype=torch.float32).contiguous()
    return torch.ops.diffkern.chebyshev_combine_kernel(weights, _unit_stride_last(feats), out_dtype)


def _fit_compiled(times, feats, degree, lam, t_min, t_max, penalize_intercept):
    weights = torch.ops.diffkern.chebyshev_weights_kernel(_host(times), None, degree, lam, t_min, t_max, 1.0,
                                                          penalize_intercept)        # [S, P, K]
    return _combine(weights, feats, torch.float32)


def _eval_compiled(coeffs, t_query, degree, t_min, t_max, out_dtype):
    basis = torch.ops.diffkern.chebyshev_basis_kernel(_host(t_query), degree, t_min, t_max)    # [S, Q, P]
    return _combine(basis, coeffs, out_dtype)


def _forecast_compiled(times, feats, t_query, degree, lam, t_min, t_max, blend,
                       penalize_intercept, out_dtype):
    weights = torch.ops.diffkern.chebyshev_weights_kernel(_host(times), _host(t_query), degree, lam, t_min,
                                                          t_max, blend, penalize_intercept)    # [S, Q, K]
    return _combine(weights, feats, out_dtype)


_fit_op = Operator("chebyshev_fit", device_of="feats")
_eval_op = Operator("chebyshev_eval", device_of="coeffs")
_forecast_op = Operator("chebyshev_forecast", device_of="feats")

_fit_op.register("reference")(fit_reference)
_eval_op.register("reference")(eval_reference)
_forecast_op.register("reference")(forecast_reference)
for _backend in ("cpu", "cuda"):   # one compiled combination kernel per device
    _fit_op.register(_backend, _fit_compiled, compiled="chebyshev_combine_kernel", dtypes={"feats": FAST_DTYPES})
    _eval_op.register(_backend, _eval_compiled, compiled="chebyshev_combine_kernel", dtypes={"coeffs": FAST_DTYPES})
    _forecast_op.register(_backend, _forecast_compiled, compiled="chebyshev_combine_kernel",
                          dtypes={"feats": FAST_DTYPES})


# --------------------------------------------------------------------------------------------
# torch custom ops (value checks + backend choice happen at run time, inside the op)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("diffkern::chebyshev_fit", mutates_args=())
def _chebyshev_fit(times: Tensor, feats: Tensor, degree: int, lam: float, t_min: float,
                   t_max: float, penalize_intercept: bool) -> Tensor:
    _check_times(times, degree, lam, 1.0, t_min, t_max, penalize_intercept)
    return _fit_op(times, feats, degree, lam, t_min, t_max, penalize_intercept)


@_chebyshev_fit.register_fake
def _(times, feats, degree, lam, t_min, t_max, penalize_intercept):
    S, _, N = feats.shape
    return feats.new_empty((S, degree + 1, N), dtype=_compute_dtype(feats.dtype))


@torch.library.custom_op("diffkern::chebyshev_eval", mutates_args=())
def _chebyshev_eval(coeffs: Tensor, t_query: Tensor, t_min: float, t_max: float,
                    out_dtype: torch.dtype) -> Tensor:
    _check_query(t_query)
    return _eval_op(coeffs, t_query, coeffs.shape[1] - 1, t_min, t_max, out_dtype)


@_chebyshev_eval.register_fake
def _(coeffs, t_query, t_min, t_max, out_dtype):
    return coeffs.new_empty((coeffs.shape[0], t_query.shape[1], coeffs.shape[2]), dtype=out_dtype)


@torch.library.custom_op("diffkern::chebyshev_forecast", mutates_args=())
def _chebyshev_forecast(times: Tensor, feats: Tensor, t_query: Tensor, degree: int, lam: float,
                        t_min: float, t_max: float, blend: float, penalize_intercept: bool,
                        out_dtype: torch.dtype) -> Tensor:
    _check_times(times, degree, lam, blend, t_min, t_max, penalize_intercept)
    _check_query(t_query)
    return _forecast_op(times, feats, t_query, degree, lam, t_min, t_max, blend,
                        penalize_intercept, out_dtype)


@_chebyshev_forecast.register_fake
def _(times, feats, t_query, degree, lam, t_min, t_max, blend, penalize_intercept, out_dtype):
    return feats.new_empty((feats.shape[0], t_query.shape[1], feats.shape[2]), dtype=out_dtype)


def _register_kernel_fakes() -> None:
    """Fake kernels for the C++ ops, so they can be traced on their own too."""
    if not _extension.load()[0]:
        return

    @torch.library.register_fake("diffkern::chebyshev_combine_kernel")
    def _(weights, feats, out_dtype):
        return feats.new_empty((feats.shape[0], weights.shape[1], feats.shape[2]), dtype=out_dtype)


_register_kernel_fakes()


# --------------------------------------------------------------------------------------------
# Public API: shape/dtype validation, then the custom op
# --------------------------------------------------------------------------------------------

def _t_range(t_range: Sequence[float]) -> tuple[float, float]:
    if not isinstance(t_range, (tuple, list)) or len(t_range) != 2:
        raise TypeError(f"t_range: expected a pair (t_min, t_max), got {t_range!r}")
    t_min, t_max = (_checks.real_number("t_range", v) for v in t_range)
    if not t_min < t_max:
        raise ValueError(f"t_range: expected t_min < t_max, got ({t_min}, {t_max})")
    return t_min, t_max


def _per_stream(name: str, t: Tensor, S: int, length_name: str, length: Optional[int] = None) -> Tensor:
    """[L] -> stride-0 [S, L]; [S, L] checked against S (and L against ``length``)."""
    _checks.tensor(name, t)
    _checks.ndim(name, t, (1, 2), f"[{length_name}] or [S, {length_name}]")
    if t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected a real dtype, got {t.dtype}")
    if t.dim() == 2 and t.shape[0] != S:
        raise ValueError(f"{name}: expected [{length_name}] or [S={S}, {length_name}], got shape {tuple(t.shape)}")
    if length is not None and t.shape[-1] != length:
        raise ValueError(f"{name}: expected {length_name}={length} entries per stream (from feats), "
                         f"got shape {tuple(t.shape)}")
    if t.shape[-1] < 1:
        raise ValueError(f"{name}: expected {length_name} >= 1, got shape {tuple(t.shape)}")
    return t.expand(S, t.shape[-1]) if t.dim() == 1 else t


def _common(times, feats, degree, lam, t_range):
    _checks.tensor("feats", feats)
    _checks.ndim("feats", feats, (3,), "[S, K, N]")
    _checks.floating("feats", feats)
    S, K, N = feats.shape
    if K < 1:
        raise ValueError(f"feats: expected K >= 1 snapshots, got shape {tuple(feats.shape)}")
    degree = _checks.integer("degree", degree, 0)
    if degree > MAX_DEGREE:
        raise ValueError(f"degree: expected <= {MAX_DEGREE}, got {degree}")
    lam = _checks.real_number("lam", lam)
    if lam < 0:
        raise ValueError(f"lam: expected lam >= 0, got {lam}")
    times = _per_stream("times", times, S, "K", K)
    _checks.same_device(times=times, feats=feats)
    return times, degree, lam, _t_range(t_range)


def chebyshev_fit(times: Tensor, feats: Tensor, *, degree: int = 4, lam: float = 0.1,
                  t_range: Sequence[float] = (0.0, 50.0), penalize_intercept: bool = True) -> Tensor:
    """Ridge-fit a Chebyshev series in time to each stream of snapshots.

    Args:
        times: ``[K]`` (shared by all streams) or ``[S, K]`` fit times.
        feats: ``[S, K, N]`` snapshots, float32/float16/bfloat16 (float64 on the reference
            backend). N must be the innermost dimension; S and K may be strided (a view of a
            preallocated history buffer is read without a copy).
        degree: series degree M (P = M + 1 coefficients).
        lam: ridge penalty >= 0. With ``lam = 0`` the times must be distinct and at least P.
        t_range: ``(t_min, t_max)`` mapped onto [-1, 1].
        penalize_intercept: if False, T_0 is not penalised (constant features are fitted
            exactly instead of shrunk).

    Returns:
        ``[S, P, N]`` float32 coefficients (float64 for float64 feats).
    """
    times, degree, lam, (t_min, t_max) = _common(times, feats, degree, lam, t_range)
    return torch.ops.diffkern.chebyshev_fit(times, feats, degree, lam, t_min, t_max,
                                            bool(penalize_intercept))


def chebyshev_eval(coeffs: Tensor, t_query: Tensor, *, t_range: Sequence[float] = (0.0, 50.0),
                   out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Evaluate Chebyshev series ``coeffs [S, P, N]`` at ``t_query [Q] or [S, Q]``.

    Returns ``[S, Q, N]`` in ``out_dtype`` (default: ``coeffs.dtype``), accumulated in fp32.
    """
    _checks.tensor("coeffs", coeffs)
    _checks.ndim("coeffs", coeffs, (3,), "[S, P, N]")
    _checks.floating("coeffs", coeffs)
    if coeffs.shape[1] < 1 or coeffs.shape[1] - 1 > MAX_DEGREE:
        raise ValueError(f"coeffs: expected 1 <= P <= {MAX_DEGREE + 1}, got shape {tuple(coeffs.shape)}")
    t_query = _per_stream("t_query", t_query, coeffs.shape[0], "Q")
    _checks.same_device(coeffs=coeffs, t_query=t_query)
    t_min, t_max = _t_range(t_range)
    dtype = _checks.out_dtype("out_dtype", out_dtype, coeffs.dtype)
    return torch.ops.diffkern.chebyshev_eval(coeffs, t_query, t_min, t_max, dtype)


def chebyshev_forecast(times: Tensor, feats: Tensor, t_query: Tensor, *, degree: int = 4,
                       lam: float = 0.1, t_range: Sequence[float] = (0.0, 50.0), blend: float = 1.0,
                       penalize_intercept: bool = True,
                       out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Forecast each stream at ``t_query`` from its snapshot history, in one pass over ``feats``.

    Equals ``chebyshev_eval(chebyshev_fit(times, feats, ...), t_query)`` at ``blend = 1``; at
    ``blend < 1`` returns ``blend * cheb + (1 - blend) * taylor`` where ``taylor`` is the
    first-order extrapolation through the last two snapshots (K >= 2 required).

    Args:
        times: ``[K]`` or ``[S, K]``; feats: ``[S, K, N]`` (see :func:`chebyshev_fit`);
        t_query: ``[Q]`` or ``[S, Q]``; blend in [0, 1].

    Returns:
        ``[S, Q, N]`` in ``out_dtype`` (default ``feats.dtype``), accumulated in fp32. The fast
        backends never materialise coefficients: they apply host-computed fp64 weights to the
        K snapshots in one read of ``feats``.
    """
    times, degree, lam, (t_min, t_max) = _common(times, feats, degree, lam, t_range)
    blend = _checks.real_number("blend", blend)
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"blend: expected 0 <= blend <= 1, got {blend}")
    if blend < 1.0 and feats.shape[1] < 2:
        raise ValueError(f"feats: blend < 1 needs K >= 2 snapshots for its Taylor term, got K={feats.shape[1]}")
    t_query = _per_stream("t_query", t_query, feats.shape[0], "Q")
    _checks.same_device(feats=feats, t_query=t_query)
    dtype = _checks.out_dtype("out_dtype", out_dtype, feats.dtype)
    return torch.ops.diffkern.chebyshev_forecast(times, feats, t_query, degree, lam, t_min, t_max,
                                                 blend, bool(penalize_intercept), dtype)
