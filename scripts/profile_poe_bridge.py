#!/usr/bin/env python
"""Where the time of a PoE-Bridge decode goes, on the fused and the reference backends.

Wraps the decoder's collaborators with wall-clock timers and decodes the same batch of held-out
problems (same seed, so the same tokens on both backends) ``--repeats`` times per backend,
*interleaved* (ref, fused, fused, ref, ...: the order rotates each repeat) so that load drift on a
shared machine hits both alike. Buckets: DLM forward, AR forward, ``poe_draft``, ``poe_verify``, AR cache bookkeeping
(``batch_select_indices`` / row copy / crop) and the rest (Python: window assembly, selection,
commits); ``cache_step`` (not a bucket, it overlaps them) is the decoder's whole step after
selection, the cache calls and the Python around them. Prints the median per bucket and backend,
and tokens/s, cache and total seconds per repeat::

    OMP_NUM_THREADS=1 python scripts/profile_poe_bridge.py --task modchain --repeats 5

``--compare-cache reference`` instead interleaves three AR cache steps after selection on one
backend: 'before' (gather every row to its winner, then crop: the step the row copy replaced),
'crop+gather' (``CausalLMTarget.row_copy = False``) and 'row-copy' (the decoder's).
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
               (adapters.CausalLMTarget, "copy_rows", "cache"),
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


def _before_advance_cache(self, run, win):
    """The decoder's cache step before the row copy (kept here to time it): gather every row to
    its winner, then crop the unused tail."""
    if not torch.equal(win.select, torch.arange(len(win.select), device=win.select.device)):
        self.target.select(run.cache, win.select)
    valid = torch.cat([run.valid[win.select], win.new_valid], dim=1)
    used = valid.any(dim=0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 0
    self.target.crop(run.cache, keep)
    run.valid = valid[:, :keep]


@contextlib.contextmanager
def cache_step(dec, step: str):
    """``step``: 'row-copy' (the decoder's), 'crop+gather' (row copy declined: crop, then gather
    every row) or 'before' (gather every row, then crop: the step this replaced)."""
    dec.target.row_copy = step == "row-copy"
    if step == "before":
        dec._advance_cache = _before_advance_cache.__get__(dec)
    try:
        yield
    finally:
        dec.__dict__.pop("_advance_cache", None)
        dec.target.row_copy = True


def one_decode(dec, prompts, eos, backend: str, step: str = "row-copy") -> dict:
    clock = defaultdict(float)
    with diffkern.use_backend(backend), cache_step(dec, step), timed(clock):
        # the whole step after selection (cache calls + the Python around them); cache_step pops it
        dec._advance_cache = _timer(dec._advance_cache, "cache_step", clock)
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
    ap.add_argument("--compare-cache", metavar="BACKEND", default=None,
                    help="instead of comparing backends, compare on BACKEND the AR cache steps after "
                         "selection: 'before' (gather every row, then crop), 'crop+gather' and "
                         "'row-copy' (only the moved rows, from the synced position; the decoder's)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = tasks.get(args.task)
    tok, draft, ar = load_shipped(args.task)
    problems = spec.problems(args.num_problems, 1234, "test")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    cfg = PoEBridgeConfig(num_particles=args.particles, weight=args.weight, window=args.window,
                          max_lookahead=spec.max_new_tokens, max_new_tokens=spec.max_new_tokens)
    dec = PoEBridgeDecoder(draft, ar, cfg)
    if args.compare_cache:     # column -> (backend, cache step)
        variants = {step: (args.compare_cache, step) for step in ("before", "crop+gather", "row-copy")}
        what = f"cache paths on the {args.compare_cache} backend"
    else:
        variants = {"reference": ("reference", "row-copy"), args.fused: (args.fused, "row-copy")}
        what = "backends"
    one_decode(dec, prompts[:2], tok.eos_token_id, args.fused)            # warm-up
    runs = {name: [] for name in variants}
    order = list(variants.items())
    for i in range(args.repeats):      # rotate the order, so no variant always runs first
        for name, (backend, step) in order[i % len(order):] + order[: i % len(order)]:
            runs[name].append(one_decode(dec, prompts, tok.eos_token_id, backend, step))
    seqs = next(iter(runs.values()))[0]["sequences"]
    same = all(r["sequences"] == seqs for rs in runs.values() for r in rs)
    print(f"PoE-Bridge decode profile: task {args.task}, {len(prompts)} problems in one batch, K={args.particles}, "
          f"w={args.weight}, W={args.window}, M={spec.max_new_tokens}, {args.threads} thread(s), "
          f"{args.repeats} interleaved repeats; identical tokens on all {what}: {same}")
    print(f"{'bucket (median s)':<20}" + "".join(f"{b:>12}" for b in runs))
    for bucket in BUCKETS + ("total", "cache_step"):
        print(f"{bucket:<20}" + "".join(f"{statistics.median(r[bucket] for r in rs):>12.3f}" for rs in runs.values()))
    for backend, rs in runs.items():
        print(f"tokens/s {backend:<11}", " ".join(f"{r['tokens_per_s']:.0f}" for r in rs))
        print(f"cache s  {backend:<11}", " ".join(f"{r['cache']:.3f}" for r in rs))
        print(f"total s  {backend:<11}", " ".join(f"{r['total']:.3f}" for r in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
