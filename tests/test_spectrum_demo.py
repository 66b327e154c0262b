"""The shipped tiny DiT and `diffkern demo spectrum` (small settings; nothing is trained)."""

import argparse
import dataclasses
import json
import math
import os

import pytest
import torch

from diffkern import spectrum
from diffkern.spectrum import demo, tiny_dit

pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(tiny_dit.ASSET_DIR, "config.json")),
                                reason="shipped tiny DiT weights missing")


def test_shipped_model_loads_offline_and_denoises():
    model = tiny_dit.load_tiny_dit()
    assert type(model).__name__ == "DiTTransformer2DModel"
    assert next(model.parameters()).dtype == torch.float32
    size = sum(os.path.getsize(os.path.join(tiny_dit.ASSET_DIR, f)) for f in os.listdir(tiny_dit.ASSET_DIR))
    assert size < 5e6
    x0, y = tiny_dit.load_digits()
    g = torch.Generator().manual_seed(0)
    x0, y = x0[:256], y[:256]
    eps = torch.randn(x0.shape, generator=g)
    t = torch.full((256,), 0.5)
    xt = 0.5 * x0 + 0.5 * eps
    with torch.no_grad():
        v = model(xt, timestep=t * 1000, class_labels=y, return_dict=False)[0]
    loss = (v - (eps - x0)).pow(2).mean().item()
    # predicting zero velocity costs E|eps - x0|^2 ~ 1.6; a trained model is far below
    assert loss < 0.5 * (eps - x0).pow(2).mean().item()


def test_spectrum_on_tiny_dit_tracks_full_compute():
    model = tiny_dit.load_tiny_dit()
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(16) % 10
    full = tiny_dit.flow_sample(model, noise, labels, 30)
    st = spectrum.enable(model, spectrum.SpectrumConfig(num_steps=30, flex_window=0.75), shadow=True)
    fast = tiny_dit.flow_sample(model, noise, labels, 30)
    assert st.nfe == len(spectrum.real_steps(30, st.config)) < 30
    assert st.shadow_errors and all(math.isfinite(e) for _, _, e in st.shadow_errors)
    rel = float((fast - full).norm() / full.norm())
    assert 0 < rel < 0.5


def test_demo_cli_contract(tmp_path):
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    out = tmp_path / "r.json"
    png = tmp_path / "g.png"
    args = parser.parse_args(["--json", str(out), "--png", str(png), "--batch", "4", "--steps", "20",
                              "--repeats", "1", "--no-progress", "--cross"])
    assert demo.run(args) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["method"] for r in rows] == ["full", "spectrum-a0.75", "spectrum-a3", "taylorseer-n4-o1",
                                           "taylorseer-n6-o1", "taylorseer-n4-o2", "fora-n3", "fora-n6"]
    for r in rows:
        assert {"method", "nfe", "speedup", "psnr", "ssim", "rel_l2"} <= set(r)
    assert rows[0]["nfe"] == 20 and rows[0]["psnr"] is None and rows[0]["rel_l2"] == 0
    cfgs = demo.METHODS(20)
    for r in rows[1:]:
        assert r["nfe"] == len(spectrum.real_steps(20, cfgs[r["method"]]))
        assert r["rel_l2"] > 0 and r["psnr"] > 0
    assert png.stat().st_size > 0
    # --cross: each forecaster on each method's real steps; the diagonal cells are the rows
    cross = result["cross"]
    assert list(cross["psnr"]) == list(demo.CROSS_FORECASTERS)
    assert cross["nfe"] == {name: len(spectrum.real_steps(20, dataclasses.replace(c, num_steps=20)))
                            for name, c in demo.CROSS_SCHEDULES.items()}
    by_method = {r["method"]: r["psnr"] for r in rows}
    assert cross["psnr"]["chebyshev"]["spectrum-a0.75"] == pytest.approx(by_method["spectrum-a0.75"], rel=1e-9)
    assert cross["psnr"]["taylor-o1"]["taylorseer-n4"] == pytest.approx(by_method["taylorseer-n4-o1"], rel=1e-9)
    assert cross["psnr"]["reuse (fora)"]["taylorseer-n6"] == pytest.approx(by_method["fora-n6"], rel=1e-9)


def test_training_info_and_digit_sizes(tmp_path):
    shipped = tiny_dit.training_info()
    assert shipped["timestep_scale"] == 1000.0 and shipped["image_size"] == 8
    assert tiny_dit.training_info(str(tmp_path)) == tiny_dit.TRAINING_DEFAULTS   # older weights
    (tmp_path / "training.json").write_text(json.dumps({"timestep_scale": 1.0}))
    assert tiny_dit.training_info(str(tmp_path))["timestep_scale"] == 1.0
    x8, y = tiny_dit.load_digits()
    x16, y16 = tiny_dit.load_digits(16)
    assert x8.shape == (1797, 1, 8, 8) and x16.shape == (1797, 1, 16, 16) and torch.equal(y, y16)
    assert x8.min() == -1 and x8.max() == 1 and -1 <= x16.min() and x16.max() <= 1
    for bad in (1, 8.0, True):
        with pytest.raises(ValueError, match="image_size"):
            tiny_dit.load_digits(bad)


def test_flow_sample_passes_the_timestep_scale():
    seen = []

    def model(x, timestep, class_labels, return_dict):
        seen.append(float(timestep[0]))
        return (torch.zeros_like(x),)

    tiny_dit.flow_sample(model, torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), 4, timestep_scale=1.0)
    assert seen == [1.0, 0.75, 0.5, 0.25]


def test_metrics():
    a = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert demo.ssim(a, a) == pytest.approx(1.0)
    assert demo.psnr(a, a) == math.inf
    b = (a + 0.1).clamp(0, 1)
    assert 10 < demo.psnr(b, a) < 30 and demo.ssim(b, a) < 1.0
    assert demo.psnr((a + 0.01), a) == pytest.approx(40.0, abs=1e-3)


def test_flow_timesteps_shift_matches_diffusers_formula():
    uniform = tiny_dit.flow_timesteps(10)
    assert torch.equal(uniform, torch.linspace(1.0, 0.0, 11, dtype=torch.float64))
    for shift in (0.2, 3.0):
        t = tiny_dit.flow_timesteps(10, shift)
        assert t[0] == 1.0 and t[-1] == 0.0 and bool((t[1:] < t[:-1]).all())
        assert torch.allclose(t, shift * uniform / (1 + (shift - 1) * uniform))
    # shift < 1 spends more of the steps near t = 0: the last step is shorter than uniform's
    assert tiny_dit.flow_timesteps(10, 0.2)[-2] < uniform[-2] < tiny_dit.flow_timesteps(10, 3.0)[-2]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift"):
            tiny_dit.flow_timesteps(10, bad)
