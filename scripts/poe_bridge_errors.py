#!/usr/bin/env python
"""Where ModChain answers go wrong, per decoding setting of the PoE-Bridge study.

Decodes the demo's held-out test problems with the demo's own settings (same seeds, same batches,
so the same tokens as ``diffkern demo poe-bridge``) and classifies every answer by its first fault
(:func:`diffkern.poe_bridge.modchain.first_fault`): ``formula`` / ``order`` / ``value`` at line
1-3, ``answer`` (every line right, the final token wrong) or ``malformed``. Prints, per setting,
the fault rates per 100 answers, the answers that are right by luck (final token right, chain
wrong), and the paired count against AR decoding (problem x seed wrong here but right for AR, and
the reverse), and the share of formula faults that restate another formula's operator and operands
under the line's variable::

    OMP_NUM_THREADS=1 python scripts/poe_bridge_errors.py [--num-problems 300] [--seeds 3]
        [--settings "ar,dlm-1,speculative,poe-bridge w=0.7 K=4"]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch

from diffkern.poe_bridge import demo, modchain, task, tasks
from diffkern.poe_bridge.adapters import MaskedLMDraft
from diffkern.poe_bridge.models import load_pair

DEFAULT_SETTINGS = ("ar", "dlm-1", "speculative", "poe-bridge w=0.5 K=4", "poe-bridge w=0.7 K=4",
                    "poe-bridge w=0.7 K=8", "official w=0.7 K=4")


def fault_label(fault) -> str:
    if fault is None:
        return "right"
    kind, line = fault
    return kind if line is None else f"{kind}@{line}"


def borrowed(problem, answer: str, line: int) -> bool:
    """Whether the faulty restated ``line`` carries another formula's operator and operands
    (the line of the other style, under this line's variable)."""
    t, x, op, y, _ = answer.split()[5 * (line - 1): 5 * line]
    return any(f.target != t and modchain.restates(f, x, op, y) for f in problem.formulas)


def decode(setting, tok, prompts, seeds, batch_size):
    """``{(problem index, seed): answer text}`` with the demo's seeds per batch."""
    out = {}
    for seed in seeds:
        for s in range(0, len(prompts), batch_size):
            gen = setting.run(prompts[s: s + batch_size], seed * 100_003 + s)
            for j, ids in enumerate(gen.sequences):
                out[s + j, seed] = task.decode_answer(tok, ids)   # the demo's scorer's decoding
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-problems", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=25)
    ap.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                    help="comma-separated setting labels, as the demo prints them")
    args = ap.parse_args(argv)
    if args.num_problems < 1 or args.seeds < 1 or args.batch_size < 1:
        ap.error("--num-problems, --seeds and --batch-size must be at least 1")
    torch.set_num_threads(1)
    spec = tasks.get("modchain")
    tok, dlm, ar = load_pair("modchain")
    draft = MaskedLMDraft(dlm, mask_token_id=tok.mask_token_id)
    demo_args = argparse.ArgumentParser()
    demo.add_arguments(demo_args)
    settings, _ = demo.build_settings(demo_args.parse_args([]), spec, draft, ar, tok.eos_token_id)
    by_label = {s.label: s for s in settings}
    wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in by_label]
    if unknown:
        ap.error(f"--settings: unknown {unknown}; known: {sorted(by_label)}")
    if "ar" not in wanted:
        wanted.insert(0, "ar")
    problems = spec.problems(args.num_problems, 1234, "test")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    seeds = list(range(args.seeds))

    faults, right, texts = {}, {}, {}
    for label in wanted:
        answers = decode(by_label[label], tok, prompts, seeds, args.batch_size)
        faults[label] = {k: modchain.first_fault(problems[k[0]], a) for k, a in answers.items()}
        texts[label] = answers
        right[label] = {k: modchain.check_answer(problems[k[0]], a) for k, a in answers.items()}
        print(f"decoded {label}", file=sys.stderr, flush=True)

    kinds = [f"{k}@{i}" for k in ("formula", "order", "value") for i in (1, 2, 3)] + ["answer", "malformed"]
    n = args.num_problems * args.seeds
    print(f"ModChain, {args.num_problems} test problems x {args.seeds} seeds: first fault per 100 answers")
    print(f"{'setting':<24}{'acc':>6}" + "".join(f"{k:>10}" for k in kinds) + f"{'lucky':>7}{'-vs AR':>8}{'+vs AR':>8}{'borrowed':>10}")
    for label in wanted:
        counts = Counter(fault_label(f) for f in faults[label].values())
        lucky = sum(1 for k, f in faults[label].items() if f is not None and right[label][k])
        worse = sum(1 for k in right[label] if right["ar"][k] and not right[label][k])
        better = sum(1 for k in right[label] if not right["ar"][k] and right[label][k])
        acc = sum(right[label].values()) / n
        formula = [(k, f[1]) for k, f in faults[label].items() if f is not None and f[0] == "formula"]
        share = sum(borrowed(problems[k[0]], texts[label][k], line) for k, line in formula) / max(len(formula), 1)
        print(f"{label:<24}{acc:>6.3f}" + "".join(f"{100 * counts[k] / n:>10.1f}" for k in kinds)
              + f"{100 * lucky / n:>7.1f}{worse:>8d}{better:>8d}{share:>10.2f}")
    print("(lucky: final token right with a faulty chain; -vs AR / +vs AR: answers wrong here and right for AR / "
          "the reverse, same problem and seed; borrowed: share of formula faults whose operator and operands are "
          "another formula's)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
