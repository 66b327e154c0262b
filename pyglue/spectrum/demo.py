"""``diffkern demo spectrum``: Spectrum vs TaylorSeer vs FORA on the shipped tiny DiT.

50-step rectified-flow sampling of a fixed-seed batch of class-conditional 8x8 digits with full
compute and with each cache method (same hook point, same warm-up). Reports NFE, wall-clock
speed-up of the whole sampling loop against full compute, PSNR / SSIM / relative L2 of the final
samples against the full-compute samples of the same seed, the per-step "shadow" forecast error
(at every post-warm-up real step: forecast first, then compare with the real feature) and the
cost of one forecast as a fraction of one transformer forward. Writes a PNG grid of samples and,
with ``--json``, ``{"rows": [{"method", "nfe", "speedup", "psnr", "ssim", "rel_l2"}, ...], ...}``.
``--cross`` adds the PSNR of every forecast rule on every method's real steps (JSON ``"cross"``);
``--weights DIR`` measures other weights from scripts/train_spectrum_dit.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

from . import hooks
from .config import FORAConfig, SpectrumConfig, TaylorSeerConfig
from .schedule import real_steps
from .tiny_dit import flow_sample, load_tiny_dit, to_images, training_info

__all__ = ["add_arguments", "run", "METHODS", "CROSS_SCHEDULES", "CROSS_FORECASTERS", "cross_study",
           "psnr", "ssim"]


def METHODS(steps: int) -> Dict[str, Optional[object]]:
    return {
        "full": None,
        "spectrum-a0.75": SpectrumConfig(flex_window=0.75, num_steps=steps),
        "spectrum-a3": SpectrumConfig(flex_window=3.0, num_steps=steps),
        "taylorseer-n4-o1": TaylorSeerConfig(interval=4, order=1, num_steps=steps),
        "taylorseer-n6-o1": TaylorSeerConfig(interval=6, order=1, num_steps=steps),
        "taylorseer-n4-o2": TaylorSeerConfig(interval=4, order=2, num_steps=steps),
        "fora-n3": FORAConfig(interval=3, num_steps=steps),
        "fora-n6": FORAConfig(interval=6, num_steps=steps),
    }


# --cross: every forecaster on every method's real steps, to tell the forecast rule's share of
# the error from the schedule's (the methods' rows change both at once).
CROSS_SCHEDULES = {"spectrum-a0.75": SpectrumConfig(flex_window=0.75), "spectrum-a3": SpectrumConfig(flex_window=3.0),
                   "taylorseer-n4": TaylorSeerConfig(interval=4), "taylorseer-n6": TaylorSeerConfig(interval=6)}
CROSS_FORECASTERS = {"chebyshev": SpectrumConfig(), "chebyshev-w0.5": SpectrumConfig(blend=0.5),
                     "taylor-o1": TaylorSeerConfig(order=1), "taylor-o2": TaylorSeerConfig(order=2),
                     "reuse (fora)": FORAConfig()}


def cross_study(sample, ref: torch.Tensor, steps: int) -> dict:
    """PSNR against ``ref`` of ``sample(config)`` for each forecaster on each schedule."""
    sched = {name: tuple(real_steps(steps, dataclasses.replace(c, num_steps=steps)))
             for name, c in CROSS_SCHEDULES.items()}
    ref_img = to_images(ref)
    table = {}
    for fname, fcfg in CROSS_FORECASTERS.items():
        table[fname] = {}
        for sname, steps_real in sched.items():
            p = psnr(to_images(sample(dataclasses.replace(fcfg, num_steps=steps, schedule=steps_real))), ref_img)
            table[fname][sname] = None if math.isinf(p) else p
    return {"nfe": {k: len(v) for k, v in sched.items()}, "psnr": table}


def _print_cross(cross: dict) -> None:
    nfe = cross["nfe"]
    print("\n--cross: PSNR (dB) of each forecaster on each method's real steps (NFE in brackets)")
    print(f"{'forecaster':<16}" + "".join(f"{name + ' (' + str(n) + ')':>22}" for name, n in nfe.items()))
    for fname, row in cross["psnr"].items():
        cells = ("inf" if row[name] is None else f"{row[name]:.2f}" for name in nfe)
        print(f"{fname:<16}" + "".join(f"{c:>22}" for c in cells))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--png", metavar="PATH", default="spectrum_samples.png",
                        help="sample grid (default: %(default)s; '' to skip)")
    parser.add_argument("--batch", type=int, default=128, help="samples per run (default %(default)s)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=float, default=1.0,
                        help="timestep shift of the flow schedule, as diffusers' FlowMatchEulerDiscrete"
                             "Scheduler (default %(default)s: uniform; < 1 spends more steps near t = 0)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per method; the fastest is reported (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--weights", default=None, help="model directory (default: shipped weights)")
    parser.add_argument("--cross", action="store_true",
                        help="also run every forecaster on every method's real steps (untimed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------------------------
# metrics on [0, 1] images [B, 1, H, W]
# ---------------------------------------------------------------------------------------------

def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean over images of 10 log10(1 / MSE) (data range 1); inf if identical."""
    mse = (x.double() - ref.double()).pow(2).flatten(1).mean(1)
    vals = torch.where(mse > 0, 10 * torch.log10(1.0 / mse), torch.full_like(mse, math.inf))
    return float(vals.mean())


def ssim(x: torch.Tensor, ref: torch.Tensor, win: int = 7) -> float:
    """Mean SSIM, scikit-image conventions (7x7 uniform window, valid region, K1=0.01,
    K2=0.03, data range 1, unbiased variances)."""
    x, y = x.double(), ref.double()
    win = min(win, x.shape[-1], x.shape[-2])
    n = win * win
    f = lambda t: F.avg_pool2d(t, win, stride=1)                      # noqa: E731
    ux, uy = f(x), f(y)
    cov = n / (n - 1)
    vx, vy, vxy = cov * (f(x * x) - ux * ux), cov * (f(y * y) - uy * uy), cov * (f(x * y) - ux * uy)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref.double()).norm() / ref.double().norm())


# ---------------------------------------------------------------------------------------------

def _median_time(fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _grid(samples: Dict[str, torch.Tensor], path: str, n: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(samples)
    fig, axes = plt.subplots(len(names), 1, figsize=(n * 0.5 + 1.6, len(names) * 0.62))
    for ax, name in zip(axes, names):
        imgs = to_images(samples[name][:n])[:, 0]                          # [n, S, S]
        row = torch.cat([torch.nn.functional.pad(im, (1, 1, 1, 1), value=1.0) for im in imgs], 1)
        ax.imshow(row.numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_tiny_dit(args.weights)
    scale = float(training_info(args.weights)["timestep_scale"])
    size = int(model.config.sample_size)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, model.config.in_channels, size, size, generator=g)
    labels = torch.arange(args.batch) % 10
    steps = args.steps
    methods = METHODS(steps)

    cross_runs = len(CROSS_FORECASTERS) * len(CROSS_SCHEDULES) if args.cross else 0
    total = (len(methods) * (args.repeats + 1) + cross_runs) * steps
    bar = tqdm(total=total, desc="spectrum demo", disable=args.no_progress, mininterval=0.5)
    samples: Dict[str, torch.Tensor] = {}
    best: Dict[str, float] = {n: math.inf for n in methods}
    nfe: Dict[str, int] = {}
    shadow: Dict[str, List[List[float]]] = {}

    def one(name, config, shadow_on=False):
        if config is None:
            hooks.disable(model)
        else:
            hooks.enable(model, config, shadow=shadow_on)
            hooks.reset(model, steps)
        t0 = time.perf_counter()
        out = flow_sample(model, noise, labels, steps, callback=lambda i: bar.update(1), shift=args.shift,
                          timestep_scale=scale)
        elapsed = time.perf_counter() - t0
        st = getattr(model, hooks._ATTR, None)
        return out, elapsed, st

    # interleave methods inside each repeat so machine-load drift hits all of them alike
    for rep in range(args.repeats):
        for name, config in methods.items():
            out, elapsed, st = one(name, config)
            best[name] = min(best[name], elapsed)
            if rep == 0:
                samples[name] = out
                nfe[name] = steps if st is None else st.nfe
    for name, config in methods.items():      # untimed pass with shadow forecasts
        _, _, st = one(name, config, shadow_on=config is not None)
        if st is not None:
            shadow[name] = [[s, e] for s, g_, e in st.shadow_errors if g_ == 0]
    cross = cross_study(lambda c: one("cross", c)[0], samples["full"], steps) if args.cross else None
    bar.close()

    # forecast cost vs one transformer forward (same batch), measured on the last histories
    t_mid = torch.full((args.batch,), 0.5 * scale)
    hooks.disable(model)
    with torch.no_grad():
        forward_s = _median_time(lambda: model(noise, timestep=t_mid, class_labels=labels))
    cost = {"forward_ms": forward_s * 1e3}
    for name in ("spectrum-a0.75", "spectrum-a3", "taylorseer-n4-o2", "fora-n3"):
        st = hooks.enable(model, methods[name])
        hooks.reset(model, steps)
        flow_sample(model, noise, labels, steps, shift=args.shift, timestep_scale=scale)
        predict_s = _median_time(lambda: st.cache.predict(0, steps - 1))
        cost[name] = {"forecast_ms": predict_s * 1e3, "fraction_of_forward": predict_s / forward_s,
                      "history": st.cache.recorded(0)}
        hooks.disable(model)

    ref = samples["full"]
    ref_img = to_images(ref)
    rows = []
    for name in methods:
        x = samples[name]
        img = to_images(x)
        p = psnr(img, ref_img)
        rows.append({"method": name, "nfe": nfe[name], "speedup": best["full"] / best[name],
                     "psnr": None if math.isinf(p) else p, "ssim": ssim(img, ref_img),
                     "rel_l2": rel_l2(x, ref), "seconds": best[name]})

    print(f"\nSpectrum demo: tiny DiT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), "
          f"{args.batch} samples, {steps} steps (shift {args.shift:g}), seed {args.seed}, {torch.get_num_threads()} thread(s), "
          f"best of {args.repeats} runs")
    print(f"{'method':<18}{'NFE':>5}{'speedup':>9}{'PSNR':>9}{'SSIM':>8}{'relL2':>9}{'shadow':>9}")
    for r in rows:
        sh = shadow.get(r["method"])
        sh_txt = f"{statistics.mean(e for _, e in sh):9.4f}" if sh else f"{'-':>9}"
        ps = "inf" if r["psnr"] is None else f"{r['psnr']:.2f}"
        print(f"{r['method']:<18}{r['nfe']:>5}{r['speedup']:>8.2f}x{ps:>9}{r['ssim']:>8.4f}"
              f"{r['rel_l2']:>9.4f}{sh_txt}")
    print("shadow = mean relative L2 of the forecast at the post-warm-up real steps")
    print(f"one transformer forward: {cost['forward_ms']:.2f} ms; one forecast: " + ", ".join(
        f"{k} {v['forecast_ms']:.3f} ms ({100 * v['fraction_of_forward']:.2f} %)"
        for k, v in cost.items() if isinstance(v, dict)))
    if cross is not None:
        _print_cross(cross)
    if args.png:
        _grid(samples, args.png)
        print(f"sample grid: {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "shadow": shadow, "forecast_cost": cost, "cross": cross,
                       "config": {"batch": args.batch, "steps": steps, "shift": args.shift, "seed": args.seed,
                                  "threads": torch.get_num_threads(), "repeats": args.repeats,
                                  "weights": args.weights or "shipped", "timestep_scale": scale}},
                      f, indent=1)
        print(f"json: {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffkern demo spectrum", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
