#!/usr/bin/env python
"""Train the tiny DiT that `diffkern demo spectrum` measures on (CPU, ~10 minutes, 1 thread).

Rectified flow (x_t = (1 - t) x_0 + t eps, target v = eps - x_0, logit-normal t) on
scikit-learn's 8x8 digits, class-conditional (10 classes, 10 % label dropout built into
DiTTransformer2DModel's label embedder), AdamW + cosine schedule, EMA of the weights. The EMA
weights are saved in fp16 with ``save_pretrained`` to ``pyglue/assets/spectrum/tiny_dit``.

    .venv/bin/python scripts/train_spectrum_dit.py [--iters 1500] [--threads 1] [--out DIR]

The defaults are the recipe of the shipped weights. The variant options (--layers,
--image-size, --timestep-scale, --dequantize) exist for scripts/spectrum_model_study.py; what
the sampler needs of them is recorded in training.json (see diffkern.spectrum.tiny_dit).
"""

import argparse
import copy
import json
import math
import os
import time

import torch

from diffkern.spectrum.tiny_dit import ASSET_DIR, MODEL_CONFIG, load_digits


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=12.0, help="stop early past this budget")
    p.add_argument("--out", default=ASSET_DIR)
    p.add_argument("--layers", type=int, default=MODEL_CONFIG["num_layers"], help="transformer blocks")
    p.add_argument("--image-size", type=int, default=8, help="digits resampled to SxS (bilinear)")
    p.add_argument("--timestep-scale", type=float, default=1000.0,
                   help="the model sees timestep = scale * t (1000: diffusers' DiT/SD3 convention)")
    p.add_argument("--dequantize", type=float, default=0.0,
                   help="add U(-d, d) noise to the 17-level pixels (0.0625 = half a level)")
    args = p.parse_args()

    from diffusers import DiTTransformer2DModel
    from tqdm import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    images, labels = load_digits(args.image_size)
    model = DiTTransformer2DModel(**{**MODEL_CONFIG, "num_layers": args.layers, "sample_size": args.image_size})
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, args.iters) / args.iters)))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny DiT: {n_params / 1e6:.2f}M parameters, {len(images)} digits, {args.iters} iterations")

    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    losses = []
    bar = tqdm(range(args.iters), desc="train", mininterval=5)
    for it in bar:
        idx = torch.randint(0, len(images), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        if args.dequantize:
            x0 = x0 + args.dequantize * (2 * torch.rand(x0.shape, generator=g) - 1)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(args.batch, generator=g))          # logit-normal times
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        v = model(xt, timestep=t * args.timestep_scale, class_labels=y, return_dict=False)[0]
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + it) / (10 + it))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
        if it % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if time.time() - start > args.max_minutes * 60:
            print(f"time budget reached after {it + 1} iterations")
            break
    minutes = (time.time() - start) / 60
    os.makedirs(args.out, exist_ok=True)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # "cast with to()" notice: the fp16 copy is only for storage
    ema.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"iterations": len(losses), "batch": args.batch, "lr": args.lr, "ema": args.ema,
                   "seed": args.seed, "threads": args.threads, "minutes": round(minutes, 2),
                   "final_loss_avg100": sum(losses[-100:]) / len(losses[-100:]),
                   "parameters": n_params, "objective": "rectified flow, v = eps - x0",
                   "timestep_scale": args.timestep_scale, "image_size": args.image_size,
                   "num_layers": args.layers, "dequantize": args.dequantize}, f, indent=1)
    print(f"saved EMA weights (fp16) to {args.out} after {minutes:.1f} min, "
          f"loss {sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
