"""diffkern.spectrum hooks on tiny randomly initialised diffusers models (nothing downloaded)."""

import warnings

import pytest
import torch
from torch import nn

from diffkern import spectrum
from diffkern.spectrum import FORAConfig, SpectrumConfig, TaylorSeerConfig

diffusers = pytest.importorskip("diffusers")

STEPS = 12


def _flux():
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        axes_dims_rope=(2, 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    B, L, T = 2, 16, 5
    x = torch.randn(B, L, 4, generator=g)
    extra = dict(encoder_hidden_states=torch.randn(B, T, 16, generator=g),
                 pooled_projections=torch.randn(B, 16, generator=g),
                 img_ids=torch.zeros(L, 3), txt_ids=torch.zeros(T, 3))
    return model, x, extra


def _dit():
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=2, num_layers=3,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=1).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 8, 8, generator=g)
    return model, x, dict(class_labels=torch.tensor([1, 2, 3]))


def _sd3():
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return model, x, dict(encoder_hidden_states=torch.randn(2, 5, 16, generator=g),
                          pooled_projections=torch.randn(2, 16, generator=g))


MODELS = {"flux": _flux, "dit": _dit, "sd3": _sd3}


def _timestep(model, i, B):
    # Flux takes t in [0, 1] (scaled by 1000 inside); the others take 0..1000.
    t = 1.0 - i / STEPS
    if not isinstance(model, diffusers.FluxTransformer2DModel):
        t = t * 1000
    return torch.full((B,), t)


@torch.no_grad()
def _sample(model, x, extra, steps=STEPS):
    """A toy Euler loop whose inputs depend on previous outputs (so errors propagate)."""
    outs = []
    for i in range(steps):
        out = model(x, timestep=_timestep(model, i, x.shape[0]), return_dict=False, **extra)[0]
        outs.append(out)
        x = x - 0.05 * out
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_all_real_is_bit_identical(name):
    model, x, extra = MODELS[name]()
    ref = _sample(model, x, extra)
    st = spectrum.enable(model, SpectrumConfig(warmup_steps=STEPS, num_steps=STEPS))
    got = _sample(model, x, extra)
    assert st.nfe == STEPS
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    spectrum.disable(model)
    assert "forward" not in model.__dict__
    assert all(torch.equal(a, b) for a, b in zip(ref, _sample(model, x, extra)))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("config", [SpectrumConfig(num_steps=STEPS, flex_window=1.0),
                                    FORAConfig(interval=3, num_steps=STEPS),
                                    TaylorSeerConfig(interval=3, order=2, num_steps=STEPS),
                                    SpectrumConfig(num_steps=STEPS, schedule=(0, 1, 2, 3, 4, 7, 8))],
                         ids=["spectrum", "fora", "taylorseer", "spectrum-explicit"])
def test_forecast_steps_run_no_block(name, config):
    model, x, extra = MODELS[name]()
    ref = _sample(model, x, extra)
    st = spectrum.enable(model, config)
    executed = []
    handles = [m.register_forward_hook(lambda *a, _n=n: executed.append(_n))
               for n, m in model.named_modules() if n.endswith(("attn", "attn1", "ff", "norm1"))]
    assert handles
    per_step = []
    with torch.no_grad():
        for i in range(STEPS):
            model(x, timestep=_timestep(model, i, x.shape[0]), **extra)
            per_step.append((st.calls[-1][2], len(executed)))
            executed.clear()
    schedule = spectrum.real_steps(STEPS, config)
    assert [k for k, _ in per_step] == ["real" if i in schedule else "forecast" for i in range(STEPS)]
    assert all(n == 0 for k, n in per_step if k == "forecast")
    assert all(n > 0 for k, n in per_step if k == "real")
    assert st.nfe == len(schedule) < STEPS
    assert st.block_calls == len(schedule) * len(st.adapter.blocks)
    got = _sample(model, x, extra)  # second run: the counter reset at step STEPS
    assert st.runs == 1 and [k for _, _, k in st.calls].count("real") == len(schedule)
    # forecasts change the output, but stay close to it for a smooth trajectory
    assert not torch.equal(got[-1], ref[-1])
    assert torch.isfinite(got[-1]).all()


def test_forecast_feeds_head_and_matches_operator():
    """The head receives exactly chebyshev_forecast of the recorded last-block features."""
    model, x, extra = _dit()
    cfg = SpectrumConfig(num_steps=STEPS, flex_window=1.0)
    seen = []
    model.norm_out.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    spectrum.enable(model, cfg)
    _sample(model, x, extra)
    sched = spectrum.real_steps(STEPS, cfg)
    first_forecast = next(i for i in range(STEPS) if i not in sched)
    # diffkern's pre-hook was registered after ours, so `seen` holds the *original* head input:
    # recorded real features, and the passthrough (embedding) on forecast steps.
    feats = torch.stack([seen[i] for i in sched if i < first_forecast], 1)      # [B, K, T, D]
    B = feats.shape[0]
    want = diffkern_forecast(feats.reshape(B, feats.shape[1], -1),
                             torch.tensor([float(i) for i in sched if i < first_forecast]),
                             first_forecast, cfg)
    # rerun, capturing what the head actually consumed after replacement
    consumed = []
    h = model.norm_out.register_forward_hook(lambda m, a, o: consumed.append(a[0].detach().clone()))
    spectrum.reset(model)
    _sample(model, x, extra)
    h.remove()
    torch.testing.assert_close(consumed[first_forecast].reshape(B, -1), want[:, 0], rtol=0, atol=0)


def diffkern_forecast(feats, times, step, cfg):
    from diffkern import ops
    return ops.chebyshev_forecast(times.double(), feats, torch.tensor([float(step)], dtype=torch.float64),
                                  degree=cfg.degree, lam=cfg.lam, t_range=(0.0, float(STEPS)))


def test_cfg_calls_are_separate_groups():
    model, x, extra = _dit()
    st = spectrum.enable(model, SpectrumConfig(num_steps=6, warmup_steps=5))
    with torch.no_grad():
        for i in range(6):
            for label in ([1, 2, 3], [9, 9, 9]):   # cond / uncond as two calls per step
                model(x, timestep=torch.full((3,), 999.0 - i), class_labels=torch.tensor(label))
    assert [(s, g) for s, g, _ in st.calls] == [(i, g) for i in range(6) for g in (0, 1)]
    assert st.cache.recorded(0) == st.cache.recorded(1) == 5
    assert st.calls[-1][2] == st.calls[-2][2] == "forecast"


def test_too_few_recorded_steps_runs_real():
    model, x, extra = _dit()
    # warm-up 2 < degree + 1 = 5: steps the schedule would forecast run for real until 5 exist
    st = spectrum.enable(model, SpectrumConfig(num_steps=STEPS, warmup_steps=2, flex_window=0.0))
    _sample(model, x, extra)
    kinds = [k for _, _, k in st.calls]
    assert kinds[:5] == ["real"] * 5 and "forecast" in kinds[5:]
    assert st.cache.recorded(0) >= 5


def test_generic_adapter_on_plain_module():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, c):
            return x + torch.tanh(self.lin(x) + c)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))
            self.final = nn.LayerNorm(8)

        def forward(self, x, t):
            c = t[:, None, None] / 1000
            for b in self.blocks:
                x = b(x, c)
            return self.final(x)

    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="cannot hook Tiny.*blocks="):
        spectrum.enable(model, SpectrumConfig())
    with pytest.raises(ValueError, match="needs both blocks="):
        spectrum.enable(model, SpectrumConfig(), blocks=model.blocks)
    ref = [model(x, torch.full((2,), 1000.0 - 50 * i)) for i in range(10)]
    st = spectrum.enable(model, SpectrumConfig(num_steps=10, flex_window=0.0),
                         blocks=model.blocks, head=model.final)
    got = [model(x, torch.full((2,), 1000.0 - 50 * i)) for i in range(10)]
    sched = spectrum.real_steps(10, st.config)
    for i in sched:
        assert torch.equal(got[i], ref[i])
    assert st.block_calls == 3 * len(sched)


def test_cannot_hook_errors_name_what_is_missing():
    model, _, _ = _dit()
    del model.norm_out
    with pytest.raises(ValueError, match="no output head `norm_out`"):
        spectrum.enable(model, SpectrumConfig())
    with pytest.raises(ValueError, match="no `transformer` attribute"):
        spectrum.enable(object(), SpectrumConfig())


def test_step_count_mismatch_is_never_silent():
    model, x, extra = _dit()
    spectrum.enable(model, SpectrumConfig(num_steps=8))
    with pytest.raises(RuntimeError, match="more steps than the schedule"):
        _sample(model, x, extra, steps=10)
    spectrum.reset(model)
    _sample(model, x, extra, steps=6)               # shorter run: detected at the next run
    with pytest.warns(RuntimeWarning, match="ran 6 steps"):
        _sample(model, x, extra, steps=8)
    spectrum.reset(model, num_steps=10)             # adapting the schedule explicitly
    _sample(model, x, extra, steps=10)
    assert spectrum.state(model).schedule == spectrum.real_steps(10, SpectrumConfig(num_steps=10))


def test_pipeline_set_timesteps_adapts_schedule():
    model, x, extra = _dit()
    sched = diffusers.FlowMatchEulerDiscreteScheduler()

    class Pipe:  # the two attributes enable() uses on a diffusers pipeline
        transformer = model
        scheduler = sched

    st = spectrum.enable(Pipe(), SpectrumConfig(num_steps=50))
    for n in (20, 50):
        sched.set_timesteps(n)
        with torch.no_grad():
            for t in sched.timesteps:
                model(x, timestep=t.expand(3), **extra)
        assert st.num_steps == n
        assert [s for s, _, k in st.calls if k == "real"] == spectrum.real_steps(n, SpectrumConfig())
    spectrum.disable(Pipe())
    assert "set_timesteps" not in sched.__dict__


def test_explicit_schedule_refuses_another_step_count():
    model, x, extra = _dit()
    sched = diffusers.FlowMatchEulerDiscreteScheduler()

    class Pipe:
        transformer = model
        scheduler = sched

    st = spectrum.enable(Pipe(), SpectrumConfig(num_steps=10, schedule=(0, 1, 2, 3, 4, 6, 9)))
    sched.set_timesteps(10)
    assert st.schedule == [0, 1, 2, 3, 4, 6, 9]
    with pytest.raises(ValueError, match="schedule is for num_steps=10, but this run has 20"):
        sched.set_timesteps(20)
    spectrum.disable(Pipe())
