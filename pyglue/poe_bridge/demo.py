"""``diffkern demo poe-bridge``: PoE-Bridge vs its baselines on the shipped tiny model pair.

Held-out letter-sorting problems (:mod:`diffkern.poe_bridge.task`); for every method: exact-check
accuracy, DLM and AR forwards per problem, and tokens/s. PoE-Bridge runs on the reference backend
and on the automatic (fused) one. ``--json PATH`` writes
``{"rows": [{"method", "backend", "accuracy", "dlm_forwards", "ar_forwards", "tokens_per_s"}, ...]}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", default=None, help="write the rows as JSON")
    parser.add_argument("--num-problems", type=int, default=200, help="held-out problems (default 200)")
    parser.add_argument("--batch-size", type=int, default=25, help="prompts per generate call")
    parser.add_argument("--particles", type=int, default=4, help="PoE-Bridge K")
    parser.add_argument("--weight", type=float, default=0.3, help="PoE-Bridge w")
    parser.add_argument("--window", type=int, default=8, help="AR verification window W")
    parser.add_argument("--lookahead", type=int, default=16, help="DLM draft span M")
    parser.add_argument("--selection", choices=["resample", "argmax"], default="resample")
    parser.add_argument("--weights", choices=["principled", "parity"], default="principled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _run_method(name, fn, problems, prompts, batch, tok):
    from tqdm.auto import tqdm
    from . import task
    gens, stats = [], {"dlm": 0, "ar": 0, "tok": 0, "time": 0.0}
    for s in tqdm(range(0, len(prompts), batch), desc=name, leave=False):
        out = fn(prompts[s: s + batch], s)
        gens += out.sequences
        st = out.stats
        stats["dlm"] += st.dlm_forwards
        stats["ar"] += st.ar_forwards
        stats["tok"] += st.new_tokens
        stats["time"] += st.wall_time
    n = len(problems)
    return {"accuracy": task.score(tok, problems, gens), "dlm_forwards": stats["dlm"] / n,
            "ar_forwards": stats["ar"] / n, "tokens_per_s": stats["tok"] / max(stats["time"], 1e-9)}


def _fused_label() -> str:
    """The backend the automatic choice takes for the demo's CPU float32 logits: cpu when the C++
    extension is built, else the reference."""
    import diffkern
    return "cpu" if diffkern.backends()["cpu"] else "auto(reference)"


def run(args: argparse.Namespace) -> int:
    import diffkern
    from . import task
    from .baselines import ar_generate, dlm_generate
    from .config import PoEBridgeConfig
    from .decoder import PoEBridgeDecoder
    from .models import load_pair
    from .adapters import MaskedLMDraft

    if args.num_problems < 1:
        raise ValueError(f"--num-problems: must be >= 1, got {args.num_problems}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")
    torch.set_num_threads(max(1, args.threads))
    tok, dlm, ar = load_pair()
    draft = MaskedLMDraft(dlm, mask_token_id=tok.mask_token_id)
    problems = task.held_out_problems(args.num_problems)
    prompts = [task.encode_prompt(tok, p) for p in problems]
    N, eos, T, top_p = task.MAX_NEW_TOKENS, tok.eos_token_id, 0.2, 0.95
    cfg = PoEBridgeConfig(num_particles=args.particles, weight=args.weight, window=args.window,
                          max_lookahead=args.lookahead, max_new_tokens=N, temperature=T, top_p=top_p,
                          selection=args.selection, weights=args.weights)
    poe = PoEBridgeDecoder(draft, ar, cfg)
    spec = PoEBridgeDecoder(draft, ar, cfg.replace(weight=0.0, num_particles=1))
    seed = args.seed
    fused = _fused_label()
    methods = [
        ("ar", fused, lambda p, s: ar_generate(ar, p, max_new_tokens=N, temperature=T, top_p=top_p,
                                               seed=seed + s, eos_token_id=eos)),
    ]
    for k in (1, 2, 4):
        methods.append((f"dlm-{k}", fused, lambda p, s, k=k: dlm_generate(
            draft, p, max_new_tokens=N, tokens_per_step=k, temperature=T, top_p=top_p, seed=seed + s,
            eos_token_id=eos)))
    methods.append(("speculative", fused, lambda p, s: spec.generate(p, seed=seed + s, eos_token_id=eos)))
    methods.append(("poe-bridge", "reference", lambda p, s: poe.generate(p, seed=seed + s, eos_token_id=eos)))
    methods.append(("poe-bridge", fused, lambda p, s: poe.generate(p, seed=seed + s, eos_token_id=eos)))

    rows = []
    for name, backend, fn in methods:
        if backend == "reference":
            with diffkern.use_backend("reference"):
                r = _run_method(f"{name}[{backend}]", fn, problems, prompts, args.batch_size, tok)
        else:
            r = _run_method(f"{name}[{backend}]", fn, problems, prompts, args.batch_size, tok)
        rows.append({"method": name, "backend": backend, **r})
    # DLM decoding at (about) PoE-Bridge's number of DLM forwards
    poe_f = rows[-1]["dlm_forwards"]
    k_eq = max(1, math.ceil(N / max(poe_f, 1e-9)))
    r = _run_method(f"dlm-{k_eq}", lambda p, s: dlm_generate(
        draft, p, max_new_tokens=N, tokens_per_step=k_eq, temperature=T, top_p=top_p, seed=seed + s,
        eos_token_id=eos), problems, prompts, args.batch_size, tok)
    rows.append({"method": f"dlm-{k_eq} (matched forwards)", "backend": fused, **r})

    print(f"PoE-Bridge demo: {len(problems)} held-out problems, K={cfg.num_particles}, w={cfg.weight}, "
          f"W={cfg.window}, M={cfg.max_lookahead}, T={T}, top_p={top_p}, {cfg.selection}/{cfg.weights} weights")
    hdr = f"{'method':<28} {'backend':<16} {'accuracy':>8} {'DLM fwd':>8} {'AR fwd':>8} {'tok/s':>9}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['method']:<28} {r['backend']:<16} {r['accuracy']:>8.3f} {r['dlm_forwards']:>8.2f} "
              f"{r['ar_forwards']:>8.2f} {r['tokens_per_s']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "config": vars(cfg), "num_problems": len(problems)}, f, indent=2)
        print("wrote", args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffkern demo poe-bridge", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
