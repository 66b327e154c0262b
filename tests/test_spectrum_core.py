"""diffkern.spectrum: config, schedule, forecaster and baseline caches (no models)."""

import math

import numpy as np
import pytest
import torch

from diffkern import spectrum
from diffkern.spectrum import FORAConfig, SpectrumConfig, TaylorSeerConfig
from diffkern.spectrum import forecaster as fc_mod


def test_official_schedules():
    assert spectrum.real_steps(50, SpectrumConfig(flex_window=0.75)) == \
        [0, 1, 2, 3, 4, 6, 8, 11, 15, 20, 25, 31, 38, 46]
    assert spectrum.real_steps(50, SpectrumConfig(flex_window=3.0)) == [0, 1, 2, 3, 4, 6, 11, 19, 30, 44]
    assert spectrum.real_steps(3, SpectrumConfig()) == [0, 1, 2]
    assert spectrum.real_steps(8, SpectrumConfig(warmup_steps=0, window_size=1, flex_window=0.0)) == list(range(8))


def test_baseline_schedules():
    assert spectrum.real_steps(20, TaylorSeerConfig(interval=4)) == [0, 1, 2, 3, 4, 8, 12, 16]
    assert spectrum.real_steps(20, FORAConfig(interval=6, warmup_steps=3)) == [0, 1, 2, 8, 14]
    assert len(spectrum.real_steps(50, FORAConfig(interval=3))) == 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(degree=-1), "degree"), (dict(blend=1.5), "blend"), (dict(mode="fast"), "mode"),
    (dict(t_range=(5, 1)), "t_range"), (dict(lam=0.0, warmup_steps=3), "lam=0"),
    (dict(num_steps=0), "num_steps"), (dict(window_size=1.5), "window_size")])
def test_config_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SpectrumConfig(**kwargs)


def test_real_steps_rejects_bad_input():
    with pytest.raises(ValueError, match="num_steps"):
        spectrum.real_steps(0, SpectrumConfig())
    with pytest.raises(TypeError, match="config"):
        spectrum.real_steps(10, {"degree": 4})


@pytest.mark.parametrize("cls", [SpectrumConfig, TaylorSeerConfig, FORAConfig])
def test_explicit_schedule_replaces_the_rule(cls):
    ts_n4 = spectrum.real_steps(50, TaylorSeerConfig(interval=4))
    cfg = cls(schedule=ts_n4)
    assert cfg.schedule == tuple(ts_n4) and spectrum.real_steps(50, cfg) == ts_n4
    assert spectrum.make_cache(cfg).real_set == frozenset(ts_n4)
    with pytest.raises(ValueError, match="schedule is for num_steps=50, but this run has 30"):
        spectrum.real_steps(30, cfg)              # never a silently wrong schedule


@pytest.mark.parametrize("schedule, exc, match", [
    ((0, 2, 2), ValueError, "strictly increasing"), ((3, 1), ValueError, "strictly increasing"),
    ((0, 50), ValueError, r"\[0, num_steps=50\)"), ((-1, 3), ValueError, "num_steps"),
    ((0, 1.5), TypeError, "int step indices"), ("0,1", TypeError, "sequence"), (7, TypeError, "sequence")])
def test_explicit_schedule_validation(schedule, exc, match):
    for cls in (SpectrumConfig, TaylorSeerConfig, FORAConfig):
        with pytest.raises(exc, match=match):
            cls(schedule=schedule)


def _ridge_forecast_np(times, feats, tq, degree, lam, t_min, t_max):
    tau = lambda t: 2 * (np.asarray(t, np.float64) - t_min) / (t_max - t_min) - 1   # noqa: E731
    X = np.polynomial.chebyshev.chebvander(tau(times), degree)
    C = np.linalg.solve(X.T @ X + lam * np.eye(degree + 1), X.T @ feats.reshape(len(times), -1))
    return np.polynomial.chebyshev.chebvander(tau([tq]), degree) @ C


def test_clean_forecast_matches_float64_ridge():
    cfg = SpectrumConfig(num_steps=30)
    fc = spectrum.SpectrumForecaster(cfg, 30)
    g = torch.Generator().manual_seed(0)
    steps = spectrum.real_steps(30, cfg)[:8]
    feats = [torch.randn(3, 4, 5, generator=g, dtype=torch.float64).float() for _ in steps]
    for s, f in zip(steps, feats):
        fc.record(0, s, f)
    got = fc.predict(0, 17)
    assert got.shape == (3, 4, 5) and got.dtype == torch.float32
    F = torch.stack(feats, 1).double().numpy()                                # [S, K, ...]
    for row in range(3):
        want = _ridge_forecast_np(steps, F[row], 17, 4, 0.1, 0.0, 30.0)
        np.testing.assert_allclose(got[row].reshape(-1).numpy(), want[0], rtol=1e-5, atol=1e-5)


def test_polynomial_trajectory_is_forecast_exactly():
    cfg = SpectrumConfig(lam=0.0, num_steps=40, degree=3, warmup_steps=5)
    fc = spectrum.SpectrumForecaster(cfg, 40)
    base = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    poly = lambda s: base * (1 + 0.1 * s - 0.01 * s ** 2 + 0.0005 * s ** 3)    # noqa: E731
    for s in spectrum.real_steps(40, cfg)[:7]:
        fc.record(0, s, poly(s))
    torch.testing.assert_close(fc.predict(0, 33), poly(33), rtol=1e-9, atol=1e-9)


def test_history_is_preallocated_strided_view_without_upcast(monkeypatch):
    fc = spectrum.SpectrumForecaster(SpectrumConfig(), 50)
    seen = []
    real = fc_mod.ops.chebyshev_forecast

    def spy(times, feats, t_query, **kw):
        seen.append(feats)
        return real(times, feats, t_query, **kw)

    monkeypatch.setattr(fc_mod.ops, "chebyshev_forecast", spy)
    g = torch.Generator().manual_seed(0)
    ptrs = set()
    for s in range(7):
        fc.record(0, s, torch.randn(2, 3, 4, generator=g).to(torch.bfloat16))
        ptrs.add(fc._groups[0].buf.data_ptr())
        if s >= 4:
            out = fc.predict(0, s + 1)
            assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 4)
    buf = fc._groups[0].buf
    assert len(ptrs) == 1 and buf.dtype == torch.bfloat16 and buf.shape[1] == 14
    assert all(f.dtype == torch.bfloat16 and f.data_ptr() == buf.data_ptr() and f.stride(-1) == 1
               and f.stride(1) == 12 and f.stride(0) == 14 * 12 for f in seen)
    assert [f.shape[1] for f in seen] == [5, 6, 7]


def test_history_grows_past_planned_capacity():
    fc = spectrum.SpectrumForecaster(SpectrumConfig(num_steps=6, warmup_steps=2, flex_window=0.0), 6)
    feats = [torch.full((1, 3), float(s)) for s in range(6)]
    for s, f in enumerate(feats):
        fc.record(0, s, f)
    assert torch.equal(fc._groups[0].buf[0, :6, :], torch.stack(feats, 1)[0])
    with pytest.raises(ValueError, match="feature changed"):
        fc.record(0, 6, torch.zeros(2, 3))


def test_parity_mode_bf16_time_axis_and_storage():
    par = spectrum.SpectrumForecaster(SpectrumConfig(mode="parity", num_steps=30), 30)
    clean = spectrum.SpectrumForecaster(SpectrumConfig(num_steps=30), 30)
    assert par.time_of(7) == -0.71875            # bf16 of (7 - 25) * 2 / 50 = -0.72
    assert par.t_range == (0.0, 50.0) and clean.t_range == (0.0, 30.0)
    g = torch.Generator().manual_seed(0)
    steps = [0, 1, 2, 3, 4, 6, 8]
    feats = [torch.randn(2, 16, generator=g) for _ in steps]
    for s, f in zip(steps, feats):
        par.record(0, s, f)
    assert par._groups[0].buf.dtype == torch.bfloat16
    out = par.predict(0, 10)
    assert out.dtype == torch.float32
    # official math: bf16 taus on (0, 50), fp32 ridge solve of bf16 history
    taus = torch.tensor([par.time_of(s) for s in steps], dtype=torch.float64)
    H = torch.stack(feats, 1).to(torch.bfloat16).double()
    want = [_ridge_forecast_np(taus.numpy(), H[r].numpy(), par.time_of(10), 4, 0.1, -1.0, 1.0) for r in range(2)]
    want = torch.tensor(np.concatenate(want)).float()
    torch.testing.assert_close(out, want.to(torch.bfloat16).float(), rtol=2e-2, atol=2e-2)


def test_blend_mixes_in_first_order_taylor():
    cfg = SpectrumConfig(blend=0.0, num_steps=20)
    fc = spectrum.SpectrumForecaster(cfg, 20)
    for s in range(5):
        fc.record(0, s, torch.full((1, 4), 2.0 * s))
    fc.record(0, 7, torch.full((1, 4), 3.0))
    # pure Taylor: h_K + (t* - t_K) / (t_K - t_{K-1}) (h_K - h_{K-1}) = 3 + (10-7)/3 * (3 - 8)
    torch.testing.assert_close(fc.predict(0, 10), torch.full((1, 4), 3.0 - 5.0))


def test_fora_reuses_last_feature():
    c = spectrum.FORACache(FORAConfig(), 50)
    assert not c.ready(0)
    c.record(0, 0, torch.ones(2, 3))
    f = torch.arange(6.0).reshape(2, 3)
    c.record(0, 1, f)
    assert c.ready(0) and torch.equal(c.predict(0, 4), f)


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_divided_differences(order):
    c = spectrum.TaylorSeerCache(TaylorSeerConfig(interval=3, order=order, warmup_steps=3), 30)
    base = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(order))
    line = lambda s: base * (1 + 0.5 * s)        # noqa: E731
    for s in [0, 1, 2, 5, 8]:
        c.record(0, s, line(s))
    assert c.recorded(0) == order + 1
    torch.testing.assert_close(c.predict(0, 10), line(10))           # exact on a line
    quad = lambda s: base * (1 + 0.5 * s + 0.25 * s * s)              # noqa: E731
    c.reset()
    for s in [0, 1, 2, 5, 8]:
        c.record(0, s, quad(s))
    # official formula: D1 = (f8 - f5)/3, D2 = (D1 - D1_old)/3; f(8 + x) ~ f8 + D1 x + D2 x^2/2
    d1_old = (quad(5) - quad(2)) / 3
    d1 = (quad(8) - quad(5)) / 3
    want = quad(8) + d1 * 2 + ((d1 - d1_old) / 3 * 2 ** 2 / 2 if order == 2 else 0)
    torch.testing.assert_close(c.predict(0, 10), want)


def test_taylorseer_warmup_drops_derivatives_like_first_enhance():
    # official: differences only refreshed for step > first_enhance - 2
    c = spectrum.TaylorSeerCache(TaylorSeerConfig(order=2, warmup_steps=5), 50)
    for s in range(3):
        c.record(0, s, torch.full((2,), float(s)))
    assert c.recorded(0) == 1
    c.record(0, 3, torch.full((2,), 3.0))   # 3 > 5 - 2 is false: still order 0
    assert c.recorded(0) == 1
    c.record(0, 4, torch.full((2,), 4.0))   # first difference; no old D1 for a second one yet
    assert c.recorded(0) == 2
    c.record(0, 8, torch.full((2,), 8.0))
    assert c.recorded(0) == 3
    torch.testing.assert_close(c.predict(0, 10), torch.full((2,), 10.0))
