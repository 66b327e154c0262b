"""PoE-Bridge stress task *Reorganize*: rearrange a multiset so that no two neighbours are equal.

Prompt: the multiset, sorted, then ``=``; answer: a rearrangement without equal neighbours::

    [BOS] a a b b c d e e = a b a b c e d e [EOS]

About two letters are valid at each step, so every token is a branch point: a decoder that fills
positions independently (parallel DLM unmasking) breaks the constraint, and importance sampling
alone (a DLM proposal reweighted toward the AR model) rarely holds an error-free window.

Corpora of different style: ``style="ar"`` takes the alphabetically smallest valid letter with
p = 0.5 (else a uniform valid letter); ``style="dlm"`` is uniform over valid letters. A letter is
*valid* when it differs from the previous one and the rest can still be arranged.

Splits by a stable hash of the multiset: bucket 0 of ten is the held-out test split, bucket 1
validation; training uses the rest.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Tuple

NAME = "reorganize"
LETTERS = [chr(ord("a") + i) for i in range(6)]
PROMPT_END = "="
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"]
VOCAB = SPECIAL_TOKENS + LETTERS + [PROMPT_END]
MIN_SIZE, MAX_SIZE = 8, 12
#: Answer canvas: 12 letters and EOS.
MAX_NEW_TOKENS = MAX_SIZE + 1
AR_SMALLEST_P = 0.5
SPLITS = {"test": 0, "validation": 1}


@dataclass(frozen=True)
class Problem:
    letters: Tuple[str, ...]   # sorted

    @property
    def prompt(self) -> str:
        return " ".join(self.letters) + " " + PROMPT_END


def _counts(letters) -> Tuple[int, ...]:
    c = Counter(letters)
    return tuple(c[x] for x in LETTERS)


@lru_cache(maxsize=None)
def arrangeable(counts: Tuple[int, ...], prev: int) -> bool:
    """Whether ``counts`` can be laid out without equal neighbours, not starting with ``prev``
    (-1: no constraint). Exact, memoised recursion."""
    if sum(counts) == 0:
        return True
    return len(valid_next(counts, prev)) > 0


@lru_cache(maxsize=None)
def valid_next(counts: Tuple[int, ...], prev: int) -> Tuple[int, ...]:
    """Indices of the letters that may come next."""
    out = []
    for i, c in enumerate(counts):
        if c and i != prev:
            rest = counts[:i] + (c - 1,) + counts[i + 1:]
            if arrangeable(rest, i):
                out.append(i)
    return tuple(out)


def split_of(problem: Problem) -> str:
    bucket = zlib.crc32("".join(problem.letters).encode()) % 10
    return {v: k for k, v in SPLITS.items()}.get(bucket, "train")


def sample_problem(rng: random.Random, split: str = "train") -> Problem:
    if split not in ("train", *SPLITS):
        raise ValueError(f"split: must be 'train', 'validation' or 'test', got {split!r}")
    while True:
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        p = Problem(tuple(sorted(rng.choice(LETTERS) for _ in range(size))))
        if arrangeable(_counts(p.letters), -1) and split_of(p) == split:
            return p


def sample_answer(problem: Problem, rng: random.Random, style: str = "ar") -> str:
    if style not in ("ar", "dlm"):
        raise ValueError(f"style: must be 'ar' or 'dlm', got {style!r}")
    counts, prev, out = list(_counts(problem.letters)), -1, []
    while sum(counts):
        options = valid_next(tuple(counts), prev)
        pick = options[0] if style == "ar" and rng.random() < AR_SMALLEST_P else rng.choice(options)
        out.append(LETTERS[pick])
        counts[pick] -= 1
        prev = pick
    return " ".join(out)


def check_answer(problem: Problem, answer: str) -> bool:
    toks = answer.split()
    return sorted(toks) == sorted(problem.letters) and all(a != b for a, b in zip(toks, toks[1:]))
