#!/usr/bin/env python
"""Where the time of a PoE-Bridge decode goes, on the fused and the reference backends.

Wraps the decoder's collaborators with wall-clock timers and decodes the same batch of held-out
problems (same seed, so the same tokens on both backends) ``--repeats`` times per backend,
*interleaved* (ref, fused, ref, fused, ...) so that load drift on a shared machine hits both
alike. Buckets: DLM forward, AR forward, ``poe_draft``, ``poe_verify``, AR cache bookkeeping
(``batch_select_indices`` / crop) and the rest (Python: window assembly, selection, commits).
Prints the median per bucket and backend, and tokens/s per repeat::

    OMP_NUM_THREADS=1 python scripts/profile_poe_bridge.py --task modchain --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict

import torch

import diffkern
from diffkern.poe_bridge import PoEBridgeConfig, PoEBridgeDecoder, load_shipped, tasks
from diffkern.poe_bridge import adapters, decoder as decoder_mod

BUCKETS = ("dlm_forward", "ar_forward", "poe_draft", "poe_verify", "cache", "python")


def _timer(fn, bucket: str, clock: dict):
    """``fn`` that also adds its wall time to ``clock[bucket]``."""
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            clock[bucket] += time.perf_counter() - t0
    return wrapper


@contextlib.contextmanager
def timed(clock: dict):
    """Patch the timed callables; ``clock[bucket]`` accumulates seconds while active."""
    patches = [(adapters.MaskedLMDraft, "logits", "dlm_forward"), (adapters.CausalLMTarget, "forward", "ar_forward"),
               (adapters.CausalLMTarget, "select", "cache"), (adapters.CausalLMTarget, "crop", "cache"),
               (decoder_mod.ops, "poe_draft", "poe_draft"), (decoder_mod.ops, "poe_verify", "poe_verify")]
    originals = []
    for owner, name, bucket in patches:
        raw = getattr(owner, "__dict__", {}).get(name, getattr(owner, name))
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(_timer(raw.__func__, bucket, clock)))
        else:
            setattr(owner, name, _timer(raw, bucket, clock))
        originals.append((owner, name, raw))
    try:
        yield
    finally:
        for owner, name, raw in originals:
            setattr(owner, name, raw)


def one_decode(dec, prompts, eos, backend: str) -> dict:
    clock = defaultdict(float)
    with diffkern.use_backend(backend), timed(clock):
        t0 = time.perf_counter()
        out = dec.generate(prompts, seed=0, eos_token_id=eos)
        total = time.perf_counter() - t0
    clock["python"] = total - sum(clock[b] for b in BUCKETS if b != "python")
    clock["total"] = total
    clock["tokens_per_s"] = out.stats.new_tokens / total
    clock["tokens"] = out.stats.new_tokens
    clock["sequences"] = out.sequences
    return clock


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=sorted(tasks.TASKS), default="modchain")
    ap.add_argument("--num-problems", type=int, default=25)
    ap.add_argument("--particles", type=int, default=4)
    ap.add_argument("--weight", type=float, default=0.7)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fused", default="cpu", help="the fused backend to compare (default cpu)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = tasks.get(args.task)
    tok, draft, ar = load_shipped(args.task)
    problems = spec.problems(args.num_problems, 1234, "test")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    cfg = PoEBridgeConfig(num_particles=args.particles, weight=args.weight, window=args.window,
                          max_lookahead=spec.max_new_tokens, max_new_tokens=spec.max_new_tokens)
    dec = PoEBridgeDecoder(draft, ar, cfg)
    one_decode(dec, prompts[:2], tok.eos_token_id, args.fused)            # warm-up
    runs = {"reference": [], args.fused: []}
    for _ in range(args.repeats):
        for backend in runs:
            runs[backend].append(one_decode(dec, prompts, tok.eos_token_id, backend))
    same = runs["reference"][0]["sequences"] == runs[args.fused][0]["sequences"]
    print(f"PoE-Bridge decode profile: task {args.task}, {len(prompts)} problems in one batch, K={args.particles}, "
          f"w={args.weight}, W={args.window}, M={spec.max_new_tokens}, {args.threads} thread(s), "
          f"{args.repeats} interleaved repeats; identical tokens on both backends: {same}")
    print(f"{'bucket (median s)':<20}" + "".join(f"{b:>12}" for b in runs))
    for bucket in BUCKETS + ("total",):
        print(f"{bucket:<20}" + "".join(f"{statistics.median(r[bucket] for r in rs):>12.3f}" for rs in runs.values()))
    for backend, rs in runs.items():
        print(f"tokens/s {backend:<11}", " ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
