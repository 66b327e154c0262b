"""The synthetic tasks of the shipped PoE-Bridge model pairs, behind one interface.

* ``modchain`` (main task, :mod:`.modchain`): a mod-10 program with a free-order chain of thought;
* ``reorganize`` (stress task, :mod:`.reorganize`): a multiset without equal neighbours;
* ``letter-sort`` (the first shipped pair, :mod:`.task`): sort a set of letters.

Each pair lives in ``pyglue/assets/poe_bridge/<task>/{tokenizer,ar,dlm}`` (letter-sort directly
in ``pyglue/assets/poe_bridge/``) and is trained by ``scripts/train_poe_bridge_models.py --task``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence

from . import modchain, reorganize, task as letter_sort

ASSET_ROOT = Path(__file__).resolve().parent.parent / "assets" / "poe_bridge"


@dataclass(frozen=True)
class TaskSpec:
    """What the training script, the demo and the tests need from a task."""

    name: str
    vocab: Sequence[str]
    max_new_tokens: int
    asset_dir: Path
    train_problem: Callable[[random.Random], object]
    answer: Callable[[object, random.Random, str], str]    # (problem, rng, style "ar"|"dlm") -> text
    problems: Callable[[int, int, str], List[object]]      # (n, seed, split "test"|"validation")
    check: Callable[[object, str], bool]

    def prompt(self, problem) -> str:
        return problem.prompt

    def score(self, tokenizer, problems: Sequence, generations: Sequence[Sequence[int]]) -> List[bool]:
        """Per-problem exact-check verdicts of generated ids (cut at the first EOS)."""
        if len(problems) != len(generations):
            raise ValueError(f"score: {len(problems)} problems but {len(generations)} generations")
        return [self.check(p, letter_sort.decode_answer(tokenizer, g)) for p, g in zip(problems, generations)]


def distinct_problems(sample: Callable[[random.Random, str], object], n: int, seed: int, split: str) -> list:
    """``n`` distinct problems (by prompt) drawn by ``sample(rng, split)``, deterministic in ``seed``."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = sample(rng, split)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def _letter_sort_problems(n: int, seed: int, split: str) -> list:
    if split != "test":
        raise ValueError(f"split: letter-sort has only a 'test' held-out split, got {split!r}")
    return letter_sort.held_out_problems(n, seed)


TASKS = {
    "modchain": TaskSpec(
        "modchain", modchain.VOCAB, modchain.MAX_NEW_TOKENS, ASSET_ROOT / "modchain",
        lambda rng: modchain.sample_problem(rng, "train"), modchain.sample_answer,
        lambda n, seed, split: distinct_problems(modchain.sample_problem, n, seed, split), modchain.check_answer),
    "reorganize": TaskSpec(
        "reorganize", reorganize.VOCAB, reorganize.MAX_NEW_TOKENS, ASSET_ROOT / "reorganize",
        lambda rng: reorganize.sample_problem(rng, "train"), reorganize.sample_answer,
        lambda n, seed, split: distinct_problems(reorganize.sample_problem, n, seed, split),
        reorganize.check_answer),
    "letter-sort": TaskSpec(
        "letter-sort", letter_sort.VOCAB, letter_sort.MAX_NEW_TOKENS, ASSET_ROOT,
        lambda rng: letter_sort.sample_problem(rng, held_out=False),
        lambda p, rng, style: letter_sort.sample_answer(p, rng),   # one corpus for both models
        _letter_sort_problems, letter_sort.check_answer),
}


def get(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: unknown PoE-Bridge task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name]
