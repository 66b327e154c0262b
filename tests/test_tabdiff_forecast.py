"""Forecasting TabDiff's denoiser trunk (Spectrum, TaylorSeer, FORA): an all-real schedule is the
plain sampler bit for bit, forecast steps really skip the trunk, NFE accounting, each rule's
forecast on the c_noise axis (reuse, exact linear / polynomial trajectories), batch-size
invariance, guidance, and errors. Tiny models: seconds."""

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from diffkern.forecast import FORAConfig, SpectrumConfig, TaylorSeerConfig, real_steps
from diffkern.tabdiff import TabDiffConfig, TabDiffSynthesizer
from diffkern.tabdiff.forecasting import TrunkForecast, trunk_evaluations
from diffkern.tabdiff.network import c_noise
from diffkern.tabdiff.sampler import sample_batch, sample_rows, sampler_tables

STEPS = 8
TINY = dict(dim_t=16, ffn_factor=2, batch_size=64, steps=STEPS, guidance_dim_t=16, checkpoint_every=1,
            sample_batch_size=97, epochs=2)
# Tiny-schedule configs (8 steps): real steps Spectrum 0,1,2,4,6; TaylorSeer 0,1,4,7; FORA 0,1,3,5,7
CONFIGS = {
    "spectrum": SpectrumConfig(num_steps=STEPS, degree=2, warmup_steps=3),
    "taylorseer": TaylorSeerConfig(num_steps=STEPS, interval=3, warmup_steps=2),
    "fora": FORAConfig(num_steps=STEPS, interval=2, warmup_steps=2),
}


def frame(n=120, seed=0, with_target=False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "age": rng.integers(18, 80, n).astype("int32"),
        "income": np.round(rng.lognormal(10, 0.5, n), 2),
        "color": rng.choice(["red", "green", "blue"], n),
        "city": rng.choice(["Oslo", "Lima", "Pune"], n),
    })
    if with_target:
        df["label"] = np.where(df["age"] > 45, "old", "young")
    return df


@pytest.fixture(scope="module")
def synth():
    return TabDiffSynthesizer(TabDiffConfig(**TINY)).fit(frame(), seed=0, progress=False)


def _rows(model, forecast, batch_size=97, num_rows=150, seed=3):
    return sample_rows(model, num_rows, seed=seed, batch_size=batch_size, steps=STEPS, progress=False,
                       forecast=forecast)


class _Counter:
    """Forward calls of a module (a hook, so the module's own code is what is counted)."""

    def __init__(self, module):
        self.calls, self.outputs = 0, []
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        self.calls += 1
        self.outputs.append(output.detach().clone())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_real_schedule_is_the_plain_sampler_bit_for_bit(synth, name):
    config = dataclasses.replace(CONFIGS[name], schedule=tuple(range(STEPS)))
    plain_num, plain_cat = _rows(synth.model, None)
    num, cat = _rows(synth.model, config)
    assert torch.equal(num, plain_num) and torch.equal(cat, plain_cat)
    pd.testing.assert_frame_equal(synth.sample(150, seed=3, progress=False, forecast=config),
                                  synth.sample(150, seed=3, progress=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forecast_steps_skip_trunk_and_encoder(synth, name):
    net, config, B = synth.model.network, CONFIGS[name], 50
    trunk, encoder, decoder = _Counter(net.trunk), _Counter(net.encoder), _Counter(net.decoder)
    state = TrunkForecast(config, STEPS)
    try:
        tables = sampler_tables(synth.model, STEPS)
        sample_batch(synth.model, tables, B, seed=0, forecast=state)
    finally:
        for c in (trunk, encoder, decoder):
            c.handle.remove()
    calls = 2 * STEPS - 1                                   # Euler + Heun (numerical columns present)
    assert decoder.calls == calls                           # the head runs on every call
    assert trunk.calls == encoder.calls == state.trunk_calls == trunk_evaluations(config, STEPS)
    assert state.forecast_calls == calls - state.trunk_calls > 0
    # a step is real or forecast as a whole: two trunk calls per real step but the last (no Heun)
    real = real_steps(STEPS, config)
    assert state.trunk_calls == 2 * len(real) - (STEPS - 1 in real)


def test_forecast_changes_the_table_and_depends_on_the_method(synth):
    plain = _rows(synth.model, None)[0]
    tables = {name: _rows(synth.model, cfg)[0] for name, cfg in CONFIGS.items()}
    for name, x_num in tables.items():
        assert torch.isfinite(x_num).all() and not torch.equal(x_num, plain), name
    assert not torch.equal(tables["spectrum"], tables["fora"])


def test_nfe_of_the_official_schedules():
    assert trunk_evaluations(None, 50) == 99 and trunk_evaluations(None, 50, heun_calls=False) == 50
    assert trunk_evaluations(SpectrumConfig(flex_window=0.75), 50) == 2 * 14       # last real step 46
    assert trunk_evaluations(SpectrumConfig(flex_window=3.0), 50) == 2 * 10
    assert trunk_evaluations(SpectrumConfig(flex_window=0.75), 50, heun_calls=False) == 14
    assert trunk_evaluations(TaylorSeerConfig(), 50) == 2 * 16
    assert trunk_evaluations(FORAConfig(), 50) == 2 * 20 - 1                      # step 49 is real, no Heun
    # too little history for the first forecast: that step runs for real (1 record per step here)
    eager = SpectrumConfig(num_steps=10, degree=4, warmup_steps=2, schedule=(0, 1))
    assert trunk_evaluations(eager, 10, heun_calls=False) == 5


def test_fora_reuses_the_last_real_feature_of_its_kind_exactly(synth):
    net, config = synth.model.network, CONFIGS["fora"]
    trunk, decoder_in = _Counter(net.trunk), []
    handle = net.decoder.register_forward_pre_hook(lambda m, args: decoder_in.append(args[0].clone()))
    try:
        state = TrunkForecast(config, STEPS)
        sample_batch(synth.model, sampler_tables(synth.model, STEPS), 40, seed=1, forecast=state)
    finally:
        trunk.handle.remove()
        handle.remove()
    real, it = set(real_steps(STEPS, config)), iter(trunk.outputs)
    last = {}                                                # call kind (0 Euler, 1 Heun) -> last real feature
    for call, hidden in enumerate(decoder_in):
        step, kind = divmod(call, 2)                         # calls: E0 H0 E1 H1 ... E7 (no Heun at the end)
        if step in real:
            last[kind] = next(it).view(hidden.shape)
        assert torch.equal(hidden, last[kind]), call        # real: the trunk's output; forecast: the last one
    assert len(decoder_in) == 2 * STEPS - 1


def _trajectory_model(synth, scalar_of_c):
    """Give the synth's network a trunk whose output is ``base * scalar_of_c(c_noise)`` for every
    row (instance attributes over the methods; ``del`` them to restore)."""
    net = synth.model.network
    shape = (1, net.n_num + len(net.num_classes), net.tokenizer.weight.shape[1])
    base = torch.linspace(-1, 1, int(np.prod(shape)), dtype=torch.float64).reshape(shape)

    def hidden(x_num, x_cat, sigma, time_emb):
        return (base * scalar_of_c(time_emb.double())).float().expand(x_num.shape[0], *shape[1:])

    net.time_emb = lambda t: c_noise(t.double()).reshape(1, 1, 1)       # the "embedding" is c_noise itself
    net.hidden = hidden


@pytest.mark.parametrize("name,config,degree", [
    ("spectrum", SpectrumConfig(num_steps=12, degree=4, lam=0.0, warmup_steps=5), 3),
    ("taylorseer", TaylorSeerConfig(num_steps=12, order=1, interval=4, warmup_steps=3), 1),
    ("fora", FORAConfig(num_steps=12, interval=3, warmup_steps=2), 0),
])
def test_each_rule_forecasts_its_exact_trajectories_on_the_c_noise_axis(synth, name, config, degree):
    """A feature that is a polynomial of the method's degree in c_noise is forecast exactly at
    every forecast call (Euler and Heun), measured by the shadow (true) trunk output."""
    coeffs = [0.7, -0.4, 0.3, 0.05][:degree + 1]
    net = synth.model.network
    _trajectory_model(synth, lambda c: sum(a * c ** k for k, a in enumerate(coeffs)))
    try:
        state = TrunkForecast(config, 12, shadow=True)
        sample_batch(synth.model, sampler_tables(synth.model, 12), 5, seed=0, forecast=state)
    finally:
        del net.time_emb, net.hidden                       # back to the class methods
    assert state.forecast_calls > 0 and len(state.errors) == state.forecast_calls
    for step, error, change, norm in state.errors:
        assert error <= 1e-5 * norm, (step, error, norm)
        assert degree == 0 or error < 1e-3 * change          # the feature moves; the forecast keeps up


def test_batch_size_does_not_change_a_forecast_table(synth):
    for config in CONFIGS.values():
        a = synth.sample(150, seed=4, progress=False, forecast=config)
        b = synth.sample(150, seed=4, batch_size=40, progress=False, forecast=config)
        pd.testing.assert_frame_equal(a, b)


def test_guided_imputation_forecasts_the_main_model_only():
    df = frame(120, with_target=True)
    synth = TabDiffSynthesizer(TabDiffConfig(**TINY)).fit(df, target="label", seed=0, progress=False)
    main, guide = _Counter(synth.model.network.trunk), _Counter(synth.guidance_model.network.trunk)
    config = CONFIGS["spectrum"]
    try:
        filled = synth.impute(df.head(30).assign(label=None), guidance=1.0, progress=False, forecast=config)
    finally:
        main.handle.remove()
        guide.handle.remove()
    assert filled["label"].notna().all()
    assert guide.calls == trunk_evaluations(None, STEPS)            # guidance: every call real
    assert main.calls == trunk_evaluations(config, STEPS)


def test_bad_forecast_argument(synth):
    with pytest.raises(TypeError, match="forecast: expected SpectrumConfig"):
        synth.sample(10, progress=False, forecast="spectrum")
    with pytest.raises(TypeError, match="forecast"):
        synth.sample(10, progress=False, forecast=TrunkForecast(CONFIGS["fora"], STEPS))
    with pytest.raises(ValueError, match=r"forecast: the config is for num_steps=50 but the sampler runs steps=8"):
        synth.sample(10, progress=False, forecast=SpectrumConfig())
    with pytest.raises(ValueError, match=r"num_steps=8 .*steps=5"):
        synth.sample(10, steps=5, progress=False, forecast=CONFIGS["fora"])
    with pytest.raises(ValueError, match="mode='clean'"):
        synth.sample(10, progress=False, forecast=SpectrumConfig(num_steps=STEPS, mode="parity"))
    with pytest.raises(ValueError, match="forecast: the TrunkForecast is for 8 steps, the tables for 6"):
        sample_batch(synth.model, sampler_tables(synth.model, 6), 3, seed=0,
                     forecast=TrunkForecast(CONFIGS["fora"], STEPS))
    with pytest.raises(TypeError, match="forecast"):
        synth.impute(frame(5).assign(age=None), progress=False, forecast=3)


def test_taylorseer_keeps_its_slope_over_a_zero_time_gap(synth):
    """Without churn (stochastic=False) a Heun call and the next Euler call share their level."""
    from diffkern.forecast import make_cache

    cache = make_cache(TaylorSeerConfig(num_steps=10, warmup_steps=0), time_range=(0.0, 1.0))
    for step, time in ((0, 0.0), (1, 1.0), (1, 1.0)):
        cache.record(0, step, torch.full((2, 3), 2.0 * time + 1.0), time=time)
    torch.testing.assert_close(cache.predict(0, 2, time=1.5), torch.full((2, 3), 4.0))
    x_num, _ = sample_rows(synth.model, 30, seed=0, batch_size=30, steps=STEPS, stochastic=False,
                           progress=False, forecast=CONFIGS["taylorseer"])
    assert torch.isfinite(x_num).all()
