#!/usr/bin/env python
"""Does Spectrum's ranking against TaylorSeer/FORA depend on the tiny DiT? (CPU, ~30 minutes)

Trains variants of the shipped tiny DiT's recipe with scripts/train_spectrum_dit.py (one thread
each, ``--jobs`` at a time), runs ``diffkern demo spectrum --cross`` on each and on the shipped
weights, and prints one markdown table: the issue's criterion (Spectrum a=3 above TaylorSeer
N=6 O=1 and FORA N=6; Spectrum a=0.75 above TaylorSeer N=4 O=1), the forecast rule compared on
Spectrum's own real steps, and a method-free smoothness figure of the last-block feature.

    .venv/bin/python scripts/spectrum_model_study.py [--out DIR] [--jobs 2] [--batch 128]

Trained weights and per-variant JSON go to DIR (default ./spectrum-study, git-ignored); a rerun
reuses what is there. Speed-ups are not reported: the runs share the machine.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

from diffkern.spectrum.tiny_dit import ASSET_DIR, flow_sample, load_tiny_dit, training_info

HERE = os.path.dirname(os.path.abspath(__file__))

# variant -> training-script arguments (None: the shipped weights, not retrained)
VARIANTS = {
    "shipped": None,
    "same recipe, seed 1": ["--seed", "1"],
    "dequantized pixels": ["--dequantize", "0.0625"],
    "smooth time input (t, not 1000 t)": ["--timestep-scale", "1"],
    "8 blocks": ["--layers", "8"],
    "16x16 digits (64 tokens)": ["--image-size", "16"],
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _train(name: str, train_args, out: str) -> str:
    if train_args is None:
        return ASSET_DIR
    path = os.path.join(out, _slug(name))
    if not os.path.isfile(os.path.join(path, "config.json")):
        log = os.path.join(out, _slug(name) + ".train.log")
        with open(log, "w") as fh:
            subprocess.run([sys.executable, os.path.join(HERE, "train_spectrum_dit.py"), "--threads", "1",
                            "--max-minutes", "30", "--out", path, *train_args],
                           check=True, stdout=fh, stderr=subprocess.STDOUT)
    return path


def _demo(name: str, weights: str, out: str, batch: int) -> dict:
    path = os.path.join(out, _slug(name) + ".demo.json")
    if not os.path.isfile(path):
        subprocess.run([sys.executable, "-m", "diffkern.cli", "demo", "spectrum", "--weights", weights,
                        "--json", path, "--png", "", "--cross", "--repeats", "1", "--threads", "1",
                        "--batch", str(batch), "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    with open(path) as fh:
        return json.load(fh)


@torch.no_grad()
def roughness(weights: str, batch: int = 64, steps: int = 50) -> float:
    """Mean |second difference| / |first difference| of the LayerNorm'd last-block feature over
    steps 10..40 of a full-compute run: ~0 for a smooth trajectory, ~1.7 for white noise."""
    model = load_tiny_dit(weights)
    size = int(model.config.sample_size)
    noise = torch.randn(batch, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    feats = []
    hook = model.norm_out.register_forward_pre_hook(lambda m, a: feats.append(a[0].double()))
    flow_sample(model, noise, torch.arange(batch) % 10, steps,
                timestep_scale=float(training_info(weights)["timestep_scale"]))
    hook.remove()
    f = torch.nn.functional.layer_norm(torch.stack(feats), feats[0].shape[-1:]).flatten(1)
    d1 = (f[1:] - f[:-1]).norm(dim=1)
    d2 = (f[2:] - 2 * f[1:-1] + f[:-2]).norm(dim=1)
    return float((d2[10:40] / d1[10:40]).mean())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="spectrum-study")
    p.add_argument("--jobs", type=int, default=2, help="trainings/demos at a time (1 thread each)")
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)

    with ThreadPoolExecutor(args.jobs) as pool:
        weights = dict(zip(VARIANTS, pool.map(lambda kv: _train(*kv, args.out), VARIANTS.items())))
        results = dict(zip(VARIANTS, pool.map(lambda n: _demo(n, weights[n], args.out, args.batch), VARIANTS)))

    cols = ["spectrum-a0.75", "taylorseer-n4-o1", "spectrum-a3", "taylorseer-n6-o1", "fora-n6"]
    print("| variant | d2/d1 | " + " | ".join(cols) + " | criterion | cheb / taylor-o1 on a0.75 steps |")
    print("|" + "---|" * (len(cols) + 4))
    for name, res in results.items():
        psnr = {r["method"]: r["psnr"] for r in res["rows"]}
        met = (psnr["spectrum-a3"] > max(psnr["taylorseer-n6-o1"], psnr["fora-n6"])
               and psnr["spectrum-a0.75"] > psnr["taylorseer-n4-o1"])
        cross = res["cross"]["psnr"]
        print(f"| {name} | {roughness(weights[name]):.2f} | " + " | ".join(f"{psnr[c]:.2f}" for c in cols)
              + f" | {'met' if met else 'not met'} | {cross['chebyshev']['spectrum-a0.75']:.2f} / "
              f"{cross['taylor-o1']['spectrum-a0.75']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
