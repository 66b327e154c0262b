"""Chebyshev operator family (diffkern.ops.chebyshev_fit / chebyshev_eval / chebyshev_forecast).

* the reference backend against an independent float64 numpy computation (chebvander + the
  normal equations solved with numpy.linalg.solve), and every compiled backend against both the
  reference and numpy, over fp32/fp16/bf16, per-stream non-uniform times, Q > 1, both intercept
  settings, blend < 1, degrees 0/1/4/7, odd N (1, 7, 65, 4099) and K = 1;
* strided (history-buffer) feats: read without a copy, equal to the contiguous result;
  stride-0 expand over S;
* torch.library.opcheck of the custom ops and of chebyshev_combine_kernel; torch.compile(fullgraph=True);
* bad input (each error names its argument), forced-backend errors, backends()/DIFFKERN_BACKEND.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as npcheb

import diffkern
from diffkern import _dispatch
from diffkern.ops import chebyshev as cheb_mod
from diffkern.ops import chebyshev_eval, chebyshev_fit, chebyshev_forecast

from conftest import backends_of, need

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
T_RANGE = (0.0, 50.0)

ALL_BACKENDS = backends_of("chebyshev_forecast")                    # reference, cpu, cuda (marked)
FAST_BACKENDS = backends_of("chebyshev_forecast", reference=False)


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


# ---------------------------------------------------------------------------------------------
# Independent float64 numpy computation (the math of the issue, written from scratch)
# ---------------------------------------------------------------------------------------------

def _np_tau(t, t_min, t_max):
    return 2.0 * (np.asarray(t, np.float64) - t_min) / (t_max - t_min) - 1.0


def np_ridge(times, degree, lam, t_range, penalize_intercept):
    """times [S, K] -> A = (X^T X + lam D)^-1 X^T [S, P, K]."""
    P = degree + 1
    D = np.eye(P)
    if not penalize_intercept:
        D[0, 0] = 0.0
    out = []
    for t_s in times:
        X = npcheb.chebvander(_np_tau(t_s, *t_range), degree)        # [K, P]
        out.append(np.linalg.solve(X.T @ X + lam * D, X.T))
    return np.stack(out)


def np_fit(times, feats, degree, lam, t_range, penalize_intercept):
    """times [S, K], feats [S, K, N] (float64 numpy) -> C [S, P, N]."""
    return np_ridge(times, degree, lam, t_range, penalize_intercept) @ feats


def np_basis(t_query, degree, t_range):
    return np.stack([npcheb.chebvander(_np_tau(tq, *t_range), degree) for tq in t_query])


def np_eval(coeffs, t_query, t_range):
    degree = coeffs.shape[1] - 1
    return np.stack([npcheb.chebvander(_np_tau(tq, *t_range), degree) @ C
                     for tq, C in zip(t_query, coeffs)])


def np_forecast(times, feats, t_query, degree, lam, t_range, blend, penalize_intercept):
    cheb = np_eval(np_fit(times, feats, degree, lam, t_range, penalize_intercept), t_query, t_range)
    if blend == 1.0:
        return cheb
    hK, hK1 = feats[:, -1:, :], feats[:, -2:-1, :]
    k = (t_query - times[:, -1:]) / (times[:, -1:] - times[:, -2:-1])   # [S, Q]
    return blend * cheb + (1.0 - blend) * (hK + k[..., None] * (hK - hK1))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _per_stream_np(t: torch.Tensor, S: int) -> np.ndarray:
    a = _np(t)
    return np.broadcast_to(a, (S, a.shape[-1])) if a.ndim == 1 else a


def assert_close(got: torch.Tensor, want, out_dtype: torch.dtype, scale: float = 0.0) -> None:
    """Compare in float64. fp32 outputs: 1e-5 relative to the magnitude (``scale``: the size of
    the summed terms, at least max |want|). fp16/bf16
    outputs: 1 ulp of the output dtype relative to the element (two roundings of nearly equal
    fp32 values may land one ulp apart) plus the same fp32 slack."""
    assert got.dtype == out_dtype, (got.dtype, out_dtype)
    g = got.detach().to("cpu", torch.float64)
    w = torch.as_tensor(np.ascontiguousarray(want), dtype=torch.float64) if isinstance(want, np.ndarray) \
        else want.detach().to("cpu", torch.float64)
    assert g.shape == w.shape, (g.shape, w.shape)
    assert torch.isfinite(g).all()
    scale = max(float(w.abs().max()), scale, 1e-3)
    tol = torch.full_like(w, 1e-5 * scale)
    if out_dtype in (torch.float16, torch.bfloat16):
        tol = tol + torch.finfo(out_dtype).eps * torch.maximum(g.abs(), w.abs())
    err = (g - w).abs()
    bad = err > tol
    assert not bad.any(), (f"{int(bad.sum())}/{bad.numel()} elements off; worst err {float(err.max()):.3g} "
                           f"(tol there {float(tol.flatten()[int(err.argmax())]):.3g}, scale {scale:.3g})")


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def make_times(S: int, K: int, per_stream: bool, seed: int) -> torch.Tensor:
    """Non-uniform, increasing times inside [2, ~40]; [S, K] distinct per stream or a shared [K]."""
    g = torch.Generator().manual_seed(seed)
    rows = 1 if not per_stream else S
    gaps = 0.5 + 3.0 * torch.rand(rows, K, generator=g, dtype=torch.float64)
    t = 2.0 + torch.cumsum(gaps, dim=1) - gaps[:, :1]
    t = 2.0 + (t - 2.0) * (36.0 / max(float((t - 2.0).max()), 1e-9)) if K > 1 else t
    t = t + torch.arange(rows, dtype=torch.float64)[:, None] * 0.7           # streams differ
    return t[0] if not per_stream else t


def make_feats(times: torch.Tensor, S: int, N: int, dtype, seed: int) -> torch.Tensor:
    """Smooth trajectories in time plus noise: [S, K, N] of ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    t = times.expand(S, times.shape[-1]).to(torch.float64) / 50.0            # [S, K]
    a = torch.randn(S, 1, N, generator=g, dtype=torch.float64)
    b = torch.randn(S, 1, N, generator=g, dtype=torch.float64)
    f = torch.sin(3.0 * a * t[..., None] + b) + 0.5 * a * t[..., None]
    f = f + 0.05 * torch.randn(f.shape, generator=g, dtype=torch.float64)
    return f.to(dtype)


def make_query(times: torch.Tensor, S: int, Q: int, per_stream: bool) -> torch.Tensor:
    """Q query times past the last fit time (what a forecaster asks for), inside t_range."""
    last = times.expand(S, times.shape[-1])[:, -1:]
    tq = last + torch.linspace(0.5, 6.0, Q, dtype=torch.float64)[None, :] * (
        1.0 + 0.3 * torch.arange(S, dtype=torch.float64)[:, None])
    return tq if per_stream else tq[0]


# name: (S, K, N, Q, degree, lam, penalize_intercept, blend, per-stream times, per-stream t_query)
CASES = {
    "S1_shared_deg4": (1, 6, 7, 1, 4, 0.1, True, 1.0, False, False),
    "S3_deg7_noint_Q3": (3, 10, 7, 3, 7, 0.01, False, 1.0, True, True),
    "S2_deg1_blend": (2, 5, 1, 5, 1, 0.5, True, 0.6, True, True),
    "K1_deg0": (2, 1, 7, 2, 0, 0.0, True, 1.0, True, False),
    "deg0_blend0_noint": (2, 4, 7, 3, 0, 0.0, False, 0.0, True, True),
    "deg4_lam0_blend_N65_Q5": (3, 5, 65, 5, 4, 0.0, True, 0.3, True, True),
    "deg7_noint_blend_shared": (2, 9, 7, 2, 7, 1e-3, False, 0.8, False, True),
}


def make_case(name: str, dtype, seed: int = 0):
    S, K, N, Q, degree, lam, pen, blend, ps_t, ps_q = CASES[name]
    times = make_times(S, K, ps_t, seed)
    feats = make_feats(times, S, N, dtype, seed + 1)
    tq = make_query(times, S, Q, ps_q)
    kw = dict(degree=degree, lam=lam, t_range=T_RANGE, penalize_intercept=pen)
    return times, feats, tq, kw, blend


def numpy_truth(times, feats, tq, kw, blend):
    """(C, Y, scale_C, scale_Y): the exact fit and forecast, and the magnitudes fp32 errors scale
    with (max of |A| |F| for the fit, |B| |A| |F| + |F_K| + |F_K-1| for the forecast)."""
    S = feats.shape[0]
    t_np, f_np, q_np = _per_stream_np(times, S), _np(feats), _per_stream_np(tq, S)
    C = np_fit(t_np, f_np, kw["degree"], kw["lam"], kw["t_range"], kw["penalize_intercept"])
    Y = np_forecast(t_np, f_np, q_np, kw["degree"], kw["lam"], kw["t_range"], blend, kw["penalize_intercept"])
    absA = np.abs(np_ridge(t_np, kw["degree"], kw["lam"], kw["t_range"], kw["penalize_intercept"]))
    absF = np.abs(f_np)
    scale_C = float((absA @ absF).max())
    scale_Y = float((np.abs(np_basis(q_np, kw["degree"], kw["t_range"])) @ absA @ absF).max())
    return C, Y, scale_C, scale_Y + 3.0 * float(absF[:, -2:].max())


# ---------------------------------------------------------------------------------------------
# Numerics: every backend against numpy (fp64), compiled backends against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_forecast_and_fit_match_numpy(backend, dtype, case):
    need(backend)
    dev = _device(backend)
    times, feats, tq, kw, blend = make_case(case, dtype)
    C_np, Y_np, sc, sy = numpy_truth(times, feats, tq, kw, blend)
    times, feats, tq = times.to(dev), feats.to(dev), tq.to(dev)
    with diffkern.use_backend(backend):
        C = chebyshev_fit(times, feats, **kw)
        Y = chebyshev_forecast(times, feats, tq, blend=blend, **kw)
        Y_f32 = chebyshev_forecast(times, feats, tq, blend=blend, out_dtype=torch.float32, **kw)
        if blend == 1.0:   # forecast == eval(fit) at blend = 1
            Y_ef = chebyshev_eval(C, tq, t_range=T_RANGE)
    assert C.shape == C_np.shape and C.device.type == dev
    assert_close(C, C_np, torch.float32, sc)
    assert_close(Y, Y_np, dtype, sy)
    assert_close(Y_f32, Y_np, torch.float32, sy)
    if blend == 1.0:
        assert_close(Y_ef, Y_np, torch.float32, sy)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_backend_matches_reference(backend, dtype, case):
    need(backend)
    dev = _device(backend)
    times, feats, tq, kw, blend = make_case(case, dtype, seed=7)
    coeffs = torch.randn(feats.shape[0], kw["degree"] + 1, feats.shape[2],
                         generator=torch.Generator().manual_seed(3)).to(dtype)
    _, _, sc, sy = numpy_truth(times, feats, tq, kw, blend)
    se = float((np.abs(np_basis(_per_stream_np(tq, feats.shape[0]), kw["degree"], T_RANGE))
                @ np.abs(_np(coeffs))).max())
    with diffkern.use_backend("reference"):
        want = (chebyshev_fit(times, feats, **kw),
                chebyshev_eval(coeffs, tq, t_range=T_RANGE),
                chebyshev_eval(coeffs, tq, t_range=T_RANGE, out_dtype=torch.float32),
                chebyshev_forecast(times, feats, tq, blend=blend, **kw))
    with diffkern.use_backend(backend):
        got = (chebyshev_fit(times.to(dev), feats.to(dev), **kw),
               chebyshev_eval(coeffs.to(dev), tq.to(dev), t_range=T_RANGE),
               chebyshev_eval(coeffs.to(dev), tq.to(dev), t_range=T_RANGE, out_dtype=torch.float32),
               chebyshev_forecast(times.to(dev), feats.to(dev), tq.to(dev), blend=blend, **kw))
    for g, w, dt, scale in zip(got, want, (torch.float32, dtype, torch.float32, dtype), (sc, se, se, sy)):
        assert w.dtype == dt
        assert_close(g, w, dt, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reference_eval_matches_numpy(dtype):
    g = torch.Generator().manual_seed(5)
    S, P, N, Q = 3, 6, 7, 4
    coeffs = torch.randn(S, P, N, generator=g).to(dtype)
    tq = 50.0 * torch.rand(S, Q, generator=g, dtype=torch.float64)
    with diffkern.use_backend("reference"):
        y = chebyshev_eval(coeffs, tq, t_range=T_RANGE)
    scale = float((np.abs(np_basis(_np(tq), P - 1, T_RANGE)) @ np.abs(_np(coeffs))).max())
    assert_close(y, np_eval(_np(coeffs), _np(tq), T_RANGE), dtype, scale)


def test_reference_float64_matches_numpy_tightly():
    times, feats, tq, kw, blend = make_case("S3_deg7_noint_Q3", torch.float64)
    C_np = numpy_truth(times, feats, tq, kw, blend)[0]
    with diffkern.use_backend("reference"):
        C = chebyshev_fit(times, feats, **kw)
        Y = chebyshev_forecast(times, feats, tq, blend=0.5, **kw)
    assert C.dtype == torch.float64 and Y.dtype == torch.float64
    Y_np = numpy_truth(times, feats, tq, kw, 0.5)[1]
    np.testing.assert_allclose(C.numpy(), C_np, rtol=1e-9, atol=1e-9 * np.abs(C_np).max())
    np.testing.assert_allclose(Y.numpy(), Y_np, rtol=1e-9, atol=1e-9 * np.abs(Y_np).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_large_odd_N(backend, dtype):
    need(backend)
    dev = _device(backend)
    S, K, N, Q = 2, 8, 4099, 5
    times = make_times(S, K, True, 11)
    feats = make_feats(times, S, N, dtype, 12)
    tq = make_query(times, S, Q, True)
    kw = dict(degree=4, lam=0.05, t_range=T_RANGE, penalize_intercept=False)
    C_np, Y_np, sc, sy = numpy_truth(times, feats, tq, kw, 0.7)
    with diffkern.use_backend(backend):
        Y = chebyshev_forecast(times.to(dev), feats.to(dev), tq.to(dev), blend=0.7, **kw)
        C = chebyshev_fit(times.to(dev), feats.to(dev), **kw)
    assert_close(Y, Y_np, dtype, sy)
    assert_close(C, C_np, torch.float32, sc)


def test_constant_feats_exact_without_intercept_penalty():
    """penalize_intercept=False fits constants exactly; the penalised intercept shrinks them."""
    times = make_times(2, 6, True, 3)
    feats = torch.full((2, 6, 3), 2.5)
    tq = make_query(times, 2, 3, True)
    for backend in ("reference", "cpu"):
        if not diffkern.backends()[backend].available:
            continue
        with diffkern.use_backend(backend):
            y_free = chebyshev_forecast(times, feats, tq, degree=3, lam=1.0, penalize_intercept=False)
            y_pen = chebyshev_forecast(times, feats, tq, degree=3, lam=1.0, penalize_intercept=True)
        torch.testing.assert_close(y_free, torch.full_like(y_free, 2.5), rtol=1e-5, atol=1e-5)
        assert (y_pen < 2.45).all()


# ---------------------------------------------------------------------------------------------
# Layouts: strided history-buffer views (no copy), stride-0 expand over S
# ---------------------------------------------------------------------------------------------

def _strided_view(contig: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (buffer, view) with ``view == contig`` laid out as ``layout``."""
    S, K, N = contig.shape
    if layout == "buffer_prefix":      # buf[:, :K] of a [S, 100, N] history buffer
        buf = torch.full((S, 100, N), float("nan"), dtype=contig.dtype)
        buf[:, :K] = contig
        return buf, buf[:, :K]
    if layout == "buffer_window":      # a sliding window in the middle of the buffer
        buf = torch.full((S, 100, N), float("nan"), dtype=contig.dtype)
        buf[:, 37:37 + K] = contig
        return buf, buf[:, 37:37 + K]
    if layout == "transposed":         # [K, S, N] buffer seen as [S, K, N]
        buf = contig.transpose(0, 1).contiguous()
        return buf, buf.transpose(0, 1)
    if layout == "strided_S":          # every other stream of a bigger batch
        buf = torch.full((2 * S, K, N), float("nan"), dtype=contig.dtype)
        buf[::2] = contig
        return buf, buf[::2]
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["buffer_prefix", "buffer_window", "transposed", "strided_S"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_strided_feats(backend, dtype, layout, monkeypatch):
    need(backend)
    S, K, N, Q = 3, 7, 67, 5
    times = make_times(S, K, True, 21)
    feats = make_feats(times, S, N, dtype, 22)
    tq = make_query(times, S, Q, True)
    kw = dict(degree=4, lam=0.05, t_range=T_RANGE)
    buf, view = _strided_view(feats, layout)
    assert not view.is_contiguous() and view.stride(-1) == 1 and torch.equal(view, feats)

    seen = []
    original = cheb_mod._unit_stride_last

    def spy(x):
        out = original(x)
        seen.append(out.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr())
        return out

    monkeypatch.setattr(cheb_mod, "_unit_stride_last", spy)
    with diffkern.use_backend(backend):
        want_y = chebyshev_forecast(times, feats, tq, blend=0.6, **kw)
        want_c = chebyshev_fit(times, feats, **kw)
        seen.clear()
        got_y = chebyshev_forecast(times, view, tq, blend=0.6, **kw)
        got_c = chebyshev_fit(times, view, **kw)
    if backend != "reference":
        assert seen == [True, True], "the compiled backend copied a strided feats view"
    torch.testing.assert_close(got_y, want_y, rtol=0, atol=0)
    torch.testing.assert_close(got_c, want_c, rtol=0, atol=0)
    assert got_y.is_contiguous() and got_y.shape == (S, Q, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blend", [1.0, 0.4])
def test_cpu_forecast_stride0_expand_over_S(dtype, blend):
    need("cpu")
    S, K, N, Q = 4, 6, 70, 3
    times = make_times(S, K, True, 31)                 # per-stream times: outputs differ per stream
    one = make_feats(times[:1], 1, N, dtype, 32)
    expanded = one.expand(S, K, N)
    assert expanded.stride(0) == 0
    tq = make_query(times, S, Q, True)
    kw = dict(degree=4, lam=0.05, t_range=T_RANGE, blend=blend)
    with diffkern.use_backend("cpu"):
        got = chebyshev_forecast(times, expanded, tq, **kw)
        want = chebyshev_forecast(times, expanded.contiguous(), tq, **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with diffkern.use_backend("reference"):
        ref = chebyshev_forecast(times, expanded.contiguous(), tq, **kw)
    assert_close(got, ref, dtype)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _ok():
    times = torch.tensor([[1.0, 2.0, 4.0, 7.0], [0.5, 3.0, 3.5, 9.0]], dtype=torch.float64)
    feats = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    tq = torch.tensor([10.0, 12.0])
    return times, feats, tq


def _bad_cases():
    t, f, q = _ok()
    nan_t = t.clone()
    nan_t[1, 2] = float("nan")
    dup_t = t.clone()
    dup_t[0, 1] = dup_t[0, 0]
    last_dup = t.clone()
    last_dup[1, 3] = last_dup[1, 2]
    fc, fit, ev = chebyshev_forecast, chebyshev_fit, chebyshev_eval
    coeffs = torch.randn(2, 3, 3)
    return {
        "K0": (lambda: fc(t[:, :0], f[:, :0], q), ValueError, "feats"),
        "K0_fit": (lambda: fit(t[:, :0], f[:, :0]), ValueError, "feats"),
        "degree_neg": (lambda: fc(t, f, q, degree=-1), ValueError, "degree"),
        "degree_float": (lambda: fit(t, f, degree=2.0), TypeError, "degree"),
        "degree_too_big": (lambda: fc(t, f, q, degree=31), ValueError, "degree"),
        "coeffs_P_too_big": (lambda: ev(torch.randn(2, 32, 3), q), ValueError, "coeffs"),
        "lam_neg": (lambda: fc(t, f, q, lam=-0.1), ValueError, "lam"),
        "lam_nan": (lambda: fit(t, f, lam=float("nan")), ValueError, "lam"),
        "singular_K_lt_P": (lambda: fc(t, f, q, degree=4, lam=0.0), ValueError, "times"),
        "singular_fit": (lambda: fit(t[:, :2], f[:, :2], degree=2, lam=0.0), ValueError, "times"),
        "times_K_mismatch": (lambda: fc(t[:, :3], f, q), ValueError, "times"),
        "times_1d_K_mismatch": (lambda: fit(t[0, :3], f), ValueError, "times"),
        "times_S_mismatch": (lambda: fc(torch.cat([t, t]), f, q), ValueError, "times"),
        "t_query_S_mismatch": (lambda: fc(t, f, q.expand(3, 2)), ValueError, "t_query"),
        "t_query_S_mismatch_eval": (lambda: ev(coeffs, q.expand(3, 2)), ValueError, "t_query"),
        "int_feats": (lambda: fc(t, f.to(torch.int32), q), TypeError, "feats"),
        "int_feats_fit": (lambda: fit(t, (f * 10).long()), TypeError, "feats"),
        "int_coeffs": (lambda: ev(coeffs.long(), q), TypeError, "coeffs"),
        "nan_times": (lambda: fc(nan_t, f, q), ValueError, "times"),
        "nan_times_fit": (lambda: fit(nan_t, f), ValueError, "times"),
        "dup_times_lam0_fc": (lambda: fc(dup_t, f, q, degree=1, lam=0.0), ValueError, "times"),
        "dup_times_lam0_fit": (lambda: fit(dup_t, f, degree=1, lam=0.0), ValueError, "times"),
        "tmin_eq_tmax": (lambda: fc(t, f, q, t_range=(5.0, 5.0)), ValueError, "t_range"),
        "tmin_gt_tmax": (lambda: fit(t, f, t_range=(50.0, 0.0)), ValueError, "t_range"),
        "tmin_gt_tmax_eval": (lambda: ev(coeffs, q, t_range=(1.0, 0.0)), ValueError, "t_range"),
        "blend_gt_1": (lambda: fc(t, f, q, blend=1.5), ValueError, "blend"),
        "blend_lt_0": (lambda: fc(t, f, q, blend=-0.01), ValueError, "blend"),
        "blend_lt1_K1": (lambda: fc(t[:, :1], f[:, :1], q, degree=0, blend=0.5), ValueError, "blend"),
        "blend_lt1_last_two_equal": (lambda: fc(last_dup, f, q, lam=0.1, blend=0.5), ValueError, "times"),
        "nan_t_query": (lambda: fc(t, f, torch.tensor([10.0, float("nan")])), ValueError, "t_query"),
        "inf_t_query_eval": (lambda: ev(coeffs, torch.tensor([float("inf")])), ValueError, "t_query"),
        "feats_2d": (lambda: fc(t, f[0], q), ValueError, "feats"),
        "out_dtype_int": (lambda: fc(t, f, q, out_dtype=torch.int32), TypeError, "out_dtype"),
    }


_BAD = _bad_cases()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", list(_BAD))
def test_bad_input(backend, name):
    need(backend)
    call, exc, arg = _BAD[name]
    with diffkern.use_backend(backend), pytest.raises(exc) as info:
        call()
    assert type(info.value) in (ValueError, TypeError)
    assert arg in str(info.value), f"message does not name {arg!r}: {info.value}"


def test_forced_backend_that_cannot_run_raises_backend_error():
    need("cpu")
    t, f, q = _ok()
    with diffkern.use_backend("cpu"), pytest.raises(diffkern.BackendError) as info:
        chebyshev_forecast(t, f.double(), q)
    msg = str(info.value)
    assert "'cpu'" in msg and "float64" in msg and "feats" in msg
    with diffkern.use_backend("cpu"), pytest.raises(diffkern.BackendError, match="coeffs dtype torch.float64"):
        chebyshev_eval(torch.randn(2, 3, 4, dtype=torch.float64), q)
    # the same call runs on the reference, and automatically (cpu declines, reference takes it)
    with diffkern.use_backend("reference"):
        want = chebyshev_forecast(t, f.double(), q)
    assert want.dtype == torch.float64
    torch.testing.assert_close(chebyshev_forecast(t, f.double(), q), want)


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="use_backend.*'gpu'"):
        with diffkern.use_backend("gpu"):
            pass


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("lam", [1e-8, 1e-11])
def test_near_singular_legal_call_is_finite(backend, lam):
    """Duplicate times and K < P are legal for lam > 0: the answer must be finite (never NaN)."""
    need(backend)
    times = torch.tensor([[1.0, 1.0, 2.0, 2.0], [3.0, 3.0, 3.0, 5.0]], dtype=torch.float64)
    feats = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    tq = torch.tensor([3.0, 6.0])
    with diffkern.use_backend(backend):
        y = chebyshev_forecast(times, feats, tq, degree=4, lam=lam)
        c = chebyshev_fit(times, feats, degree=4, lam=lam, penalize_intercept=False)
    assert torch.isfinite(y).all() and torch.isfinite(c).all()
    Y_np = numpy_truth(times, feats, tq, dict(degree=4, lam=lam, t_range=T_RANGE,
                                              penalize_intercept=True), 1.0)[1]
    # ill-conditioned on purpose: only ask for agreement at the fp32-times-condition level
    assert np.abs(_np(y) - Y_np).max() <= 1e-2 * max(1.0, np.abs(Y_np).max())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_extremely_small_lam_is_finite_or_value_error(backend):
    need(backend)
    times = torch.tensor([1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    feats = torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(1))
    with diffkern.use_backend(backend):
        try:
            y = chebyshev_forecast(times, feats, torch.tensor([3.0]), degree=4, lam=1e-14)
        except ValueError as exc:
            assert "times" in str(exc) or "lam" in str(exc)
            return
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_numerically_singular_system_is_a_value_error_on_every_backend(backend):
    # lam=0, degree 7 on times 0..7 squeezed into a tiny corner of t_range: distinct times, but
    # the normal equations are singular to fp64 precision (the reference used to return noise).
    need(backend)
    times = torch.arange(8, dtype=torch.float64)
    feats = torch.randn(1, 8, 3, generator=torch.Generator().manual_seed(2))
    with diffkern.use_backend(backend), pytest.raises(ValueError, match="times: .*numerically singular"):
        chebyshev_forecast(times, feats, torch.tensor([9.0]), degree=7, lam=0.0, t_range=(0.0, 1e4))


# ---------------------------------------------------------------------------------------------
# Backend table and DIFFKERN_BACKEND
# ---------------------------------------------------------------------------------------------

def test_backends_table():
    table = diffkern.backends()
    assert list(table) == ["reference", "cpu", "cuda", "triton"]
    for name, status in table.items():
        assert isinstance(status.available, bool)
        assert isinstance(status.reason, str) and status.reason, name
        assert bool(status) == status.available
    assert table["reference"].available
    if not torch.cuda.is_available():
        assert not table["cuda"].available


def test_env_var_forces_reference(monkeypatch):
    need("cpu")
    calls = []
    for backend in ("reference", "cpu"):
        impl = cheb_mod._forecast_op.impls[backend]

        def spy(*args, _fn=impl.fn, _b=backend, **kwargs):
            calls.append(_b)
            return _fn(*args, **kwargs)

        monkeypatch.setitem(cheb_mod._forecast_op.impls, backend, dataclasses.replace(impl, fn=spy))
    t, f, q = _ok()
    monkeypatch.delenv("DIFFKERN_BACKEND", raising=False)
    assert _dispatch.forced_backend() is None
    chebyshev_forecast(t, f, q)
    assert calls == ["cpu"]                     # automatic choice on CPU tensors
    monkeypatch.setenv("DIFFKERN_BACKEND", "reference")
    assert _dispatch.forced_backend() == "reference"
    chebyshev_forecast(t, f, q)
    assert calls == ["cpu", "reference"]
    with diffkern.use_backend("cpu"):          # the context wins over the environment
        chebyshev_forecast(t, f, q)
    assert calls[-1] == "cpu"
    monkeypatch.setenv("DIFFKERN_BACKEND", "cpu")
    with pytest.raises(diffkern.BackendError, match="float64"):
        chebyshev_forecast(t, f.double(), q)
    monkeypatch.setenv("DIFFKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DIFFKERN_BACKEND"):
        chebyshev_forecast(t, f, q)


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    need(backend)
    S, K, N, Q = 2, 5, 9, 3
    times = make_times(S, K, True, 41)
    feats = make_feats(times, S, N, torch.float32, 42)
    tq = make_query(times, S, Q, True)
    _, strided = _strided_view(make_feats(times, S, N, torch.bfloat16, 43), "buffer_window")
    coeffs = torch.randn(S, 4, N, generator=torch.Generator().manual_seed(44)).to(torch.float16)
    ops = torch.ops.diffkern
    with diffkern.use_backend(backend):
        torch.library.opcheck(ops.chebyshev_fit.default, (times, feats, 3, 0.1, 0.0, 50.0, True))
        torch.library.opcheck(ops.chebyshev_fit.default, (times, strided, 4, 0.0, 0.0, 50.0, False))
        torch.library.opcheck(ops.chebyshev_eval.default, (coeffs, tq, 0.0, 50.0, torch.float32))
        torch.library.opcheck(ops.chebyshev_eval.default, (coeffs, tq, 0.0, 50.0, torch.float16))
        torch.library.opcheck(ops.chebyshev_forecast.default,
                              (times, feats, tq, 4, 0.1, 0.0, 50.0, 1.0, True, torch.float32))
        torch.library.opcheck(ops.chebyshev_forecast.default,
                              (times, strided, tq, 2, 0.01, 0.0, 50.0, 0.5, False, torch.bfloat16))


def test_opcheck_chebyshev_combine_kernel():
    need("cpu")
    g = torch.Generator().manual_seed(45)
    S, Q, K, N = 2, 5, 4, 70
    weights = torch.randn(S, Q, K, generator=g)
    feats = torch.randn(S, K, N, generator=g)
    _, strided = _strided_view(feats.to(torch.bfloat16), "buffer_window")
    torch.library.opcheck(torch.ops.diffkern.chebyshev_combine_kernel.default, (weights, feats, torch.float32))
    torch.library.opcheck(torch.ops.diffkern.chebyshev_combine_kernel.default, (weights, strided, torch.float16))
    # and it computes out[s, q] = sum_k W[s, q, k] feats[s, k]
    got = torch.ops.diffkern.chebyshev_combine_kernel(weights, feats, torch.float32)
    torch.testing.assert_close(got, weights.double() @ feats.double(), rtol=1e-5, atol=1e-5,
                               check_dtype=False)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("offset", [0, 1])
def test_chebyshev_combine_kernel_bf16_input_every_output(out_dtype, offset):
    """bf16 rows are read as even/odd pairs (csrc/cpu/vec16.h): full 64-element tiles, a ragged
    tail and rows starting at an odd element (2-byte aligned) must land every output in place."""
    need("cpu")
    g = torch.Generator().manual_seed(46)
    S, Q, K, N = 2, 3, 5, 64 * 3 + 5
    weights = torch.randn(S, Q, K, generator=g)
    buffer = torch.randn(S, K + 1, N + offset, generator=g).to(torch.bfloat16)
    feats = buffer[:, 1:, offset:]                                  # strided in S and K, odd start
    got = torch.ops.diffkern.chebyshev_combine_kernel(weights, feats, out_dtype)
    want = (weights.double() @ feats.double()).to(out_dtype)
    assert got.dtype == out_dtype
    tol = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out_dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def test_torch_compile_fullgraph_matches_eager():
    S, K, N, Q = 2, 6, 9, 3
    times = make_times(S, K, True, 51)
    feats = make_feats(times, S, N, torch.float32, 52)
    tq = make_query(times, S, Q, True)

    def step(times, feats, tq):
        c = chebyshev_fit(times, feats, degree=3, lam=0.05, penalize_intercept=False)
        y1 = chebyshev_eval(c, tq, out_dtype=torch.bfloat16)
        y2 = chebyshev_forecast(times, feats, tq, degree=3, lam=0.05, blend=0.7)
        return c, y1, y2 * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for backend in ("cpu", "reference"):
        if not diffkern.backends()[backend].available:
            continue
        with diffkern.use_backend(backend):
            got, want = compiled(times, feats, tq), step(times, feats, tq)
        for g_, w_ in zip(got, want):
            assert g_.dtype == w_.dtype and g_.shape == w_.shape
            torch.testing.assert_close(g_, w_, rtol=1e-6, atol=1e-6)
