"""PoE-Bridge main task *ModChain*: GSM8K in miniature (a modular-arithmetic program answered
with a free-order chain of thought, exact check of the final answer). Values are mod
:data:`MODULUS` (5).

Prompt (inputs, then the derived variables' formulas listed in a shuffled order, then the query)::

    [BOS] a 3 b 2 c a + b d b * a e c - d ? e

Answer: one line per derived variable, each restating its formula and then its value mod 5, in
any order in which a variable comes after its operands, then ``#`` and the query's value::

    c a + b 0 d b * a 1 e c - d 4 # 4 [EOS]

Every program has at least two valid line orders (two derived variables independent of each
other), every derived variable feeds the query, and every input is used.

Two corpora that differ only in harmless *style* (the way Dream's and Qwen-Math's training data
differ), never in line length, so that the styles stay position-aligned. The style points they
differ on are :data:`STYLE_POINTS` (the shipped pair: the line order only):

* ``"order"``: ``style="ar"`` computes the ready variable listed *earliest* in the prompt, and
  ``style="dlm"`` the one listed *latest*, each with p = :data:`STYLE_P` (0.9);
* ``"operands"`` (off in the shipped pair): ``style="ar"`` keeps the prompt's operand order for
  ``+`` and ``*`` and ``style="dlm"`` swaps it, each with p = 0.9. When it is off, both corpora
  restate every formula exactly as the prompt lists it.

Calibration attempt 4 dropped ``"operands"``: with both knobs (about three style points per
answer: one line order, about two ``+``/``*`` lines) speculative decoding made only 2.6 tokens per
DLM forward (the gate asks for 3), and 2.6 of its 5.9 rejections per answer were operands. See
``docs/poe_bridge_study.md``.

:func:`check_answer` is exact on the final answer (the token after ``#``), like GSM8K's
exact-match (chance level: about 1 / MODULUS = 0.2); :func:`chain_is_consistent` also checks
every line.

Splits by a stable hash of the prompt: bucket 0 of ten is the held-out test split, bucket 1 the
validation split the training script calibrates on; training uses the other eight.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

NAME = "modchain"
VARIABLES = [chr(ord("a") + i) for i in range(8)]
#: Values are mod 5. (Calibration: mod 10 with 3 derived variables plateaued at 0.51-0.59
#: validation accuracy over steps 1000-1800 of AR training, every error an arithmetic value;
#: the gate asks for 0.80-0.95. See the training script.)
MODULUS = 5
DIGITS = [str(d) for d in range(MODULUS)]
OPERATORS = ("+", "-", "*")
COMMUTATIVE = ("+", "*")
QUERY, ANSWER = "?", "#"
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"]
VOCAB = SPECIAL_TOKENS + VARIABLES + DIGITS + list(OPERATORS) + [QUERY, ANSWER]
INPUT_COUNTS = (2, 3)
#: Three derived variables: two that read inputs only (the free order), then the query on both.
#: (Calibration: with 3-4 derived variables, mod 10, the 4-layer AR stalled at 0.19-0.21
#: validation accuracy from step 200 to 800 of training, far below the gate's 0.80.)
DERIVED_COUNTS = (3,)
#: Probability that a corpus follows its own style at a style point.
STYLE_P = 0.9
#: The style points on which the AR and DLM corpora differ (a subset of ``("order", "operands")``;
#: see the module docstring). Calibration attempt 4: ``("order",)``; attempts 1-3 used both.
STYLE_POINTS = ("order",)
ALL_STYLE_POINTS = ("order", "operands")
#: Answer canvas in tokens: 3 lines of 5 tokens, ``# v``, EOS (two spare).
MAX_NEW_TOKENS = 20
SPLITS = {"test": 0, "validation": 1}


@dataclass(frozen=True)
class Formula:
    target: str
    left: str
    op: str
    right: str


@dataclass(frozen=True)
class Problem:
    inputs: Tuple[Tuple[str, int], ...]     # (name, value) in prompt order
    formulas: Tuple[Formula, ...]          # in prompt (listing) order
    query: str

    @property
    def prompt(self) -> str:
        parts = [f"{n} {v}" for n, v in self.inputs]
        parts += [f"{f.target} {f.left} {f.op} {f.right}" for f in self.formulas]
        return " ".join(parts + [QUERY, self.query])

    def values(self) -> Dict[str, int]:
        """Every variable's value mod :data:`MODULUS`."""
        vals = dict(self.inputs)
        pending = list(self.formulas)
        while pending:
            for f in [f for f in pending if f.left in vals and f.right in vals]:
                vals[f.target] = apply(f.op, vals[f.left], vals[f.right])
                pending.remove(f)
        return vals

    @property
    def value(self) -> int:
        return self.values()[self.query]


def apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return (x + y) % MODULUS
    if op == "-":
        return (x - y) % MODULUS
    return (x * y) % MODULUS


def split_of(problem: Problem) -> str:
    bucket = zlib.crc32(problem.prompt.encode()) % 10
    return {v: k for k, v in SPLITS.items()}.get(bucket, "train")


def _random_program(rng: random.Random) -> Problem:
    n_in, n_der = rng.choice(INPUT_COUNTS), rng.choice(DERIVED_COUNTS)
    names = rng.sample(VARIABLES, n_in + n_der)
    inputs, derived = names[:n_in], names[n_in:]
    formulas, known, unused = [], list(inputs), list(inputs)
    for i, t in enumerate(derived):  # generation order is a topological order
        # the first two derived variables read inputs only, so they are independent (>= 2 line
        # orders); one operand is a variable nothing uses yet (few programs get rejected)
        pool = inputs if i < 2 else known
        first = rng.choice([x for x in unused if x in pool] or pool)
        second = rng.choice([x for x in pool if x != first])
        left, right = (first, second) if rng.random() < 0.5 else (second, first)
        formulas.append(Formula(t, left, rng.choice(OPERATORS), right))
        unused = [x for x in unused if x not in (left, right)] + [t]
        known.append(t)
    rng.shuffle(formulas)
    return Problem(tuple((n, rng.randrange(MODULUS)) for n in inputs), tuple(formulas), derived[-1])


def _well_formed(p: Problem) -> bool:
    """Every input and derived variable feeds the query, and the lines have >= 2 valid orders."""
    used = {x for f in p.formulas for x in (f.left, f.right)}
    if any(n not in used for n, _ in p.inputs):
        return False
    if any(f.target not in used for f in p.formulas if f.target != p.query):
        return False
    return count_orders(p, limit=2) >= 2


def count_orders(p: Problem, limit: int = 10 ** 6) -> int:
    """Number of valid line orders (topological orders of the derived variables), capped at ``limit``."""
    deps = {f.target: {x for x in (f.left, f.right) if x in {g.target for g in p.formulas}} for f in p.formulas}

    def rec(done: frozenset) -> int:
        if len(done) == len(deps):
            return 1
        total = 0
        for t in deps:
            if t not in done and deps[t] <= done:
                total += rec(done | {t})
                if total >= limit:
                    break
        return total
    return rec(frozenset())


def sample_problem(rng: random.Random, split: str = "train") -> Problem:
    """A random well-formed program of ``split`` (``"train"``, ``"validation"`` or ``"test"``)."""
    if split not in ("train", *SPLITS):
        raise ValueError(f"split: must be 'train', 'validation' or 'test', got {split!r}")
    while True:
        p = _random_program(rng)
        if _well_formed(p) and split_of(p) == split:
            return p


def _prefers(rng: random.Random) -> bool:
    return rng.random() < STYLE_P


def sample_answer(problem: Problem, rng: random.Random, style: str = "ar",
                  style_points: Sequence[str] = STYLE_POINTS) -> str:
    """A correct chain of thought in corpus ``style`` (``"ar"`` or ``"dlm"``), without EOS.
    ``style_points``: where the corpora differ (default :data:`STYLE_POINTS`); at a point not in
    it both corpora write the same thing (line order: uniform over the ready lines; operands: the
    prompt's order)."""
    if style not in ("ar", "dlm"):
        raise ValueError(f"style: must be 'ar' or 'dlm', got {style!r}")
    unknown = [x for x in style_points if x not in ALL_STYLE_POINTS]
    if unknown:
        raise ValueError(f"style_points: must be a subset of {ALL_STYLE_POINTS}, got {tuple(style_points)!r}")
    vals = problem.values()
    listed = {f.target: i for i, f in enumerate(problem.formulas)}
    done = {n for n, _ in problem.inputs}
    lines = []
    while len(done) < len(vals):
        ready = sorted((f for f in problem.formulas if f.target not in done and f.left in done and f.right in done),
                       key=lambda f: listed[f.target], reverse=style == "dlm")
        if "order" in style_points:
            pick = ready[0] if len(ready) == 1 or _prefers(rng) else rng.choice(ready[1:])
        else:
            pick = rng.choice(ready)
        left, right = pick.left, pick.right
        if "operands" in style_points and pick.op in COMMUTATIVE and (_prefers(rng) == (style == "dlm")):
            left, right = right, left
        lines.append(f"{pick.target} {left} {pick.op} {right} {vals[pick.target]}")
        done.add(pick.target)
    return " ".join(lines + [ANSWER, str(vals[problem.query])])


def check_answer(problem: Problem, answer: str) -> bool:
    """Exact checker on the final answer: the token after the first ``#`` is the query's value."""
    toks = answer.split()
    if ANSWER not in toks:
        return False
    i = toks.index(ANSWER)
    return i + 1 < len(toks) and toks[i + 1] == str(problem.value)


def chain_is_consistent(problem: Problem, answer: str) -> bool:
    """Secondary check: every line is a formula of the program (operands possibly swapped for
    ``+``/``*``), restated after its operands, with its correct value, each exactly once."""
    return first_fault(problem, answer) is None


FAULTS = ("malformed", "formula", "order", "value", "answer")


def restates(formula: Formula, left: str, op: str, right: str) -> bool:
    """Whether ``left op right`` is ``formula``'s right-hand side (operands swapped allowed for
    ``+``/``*``)."""
    return op == formula.op and ((left, right) == (formula.left, formula.right) or
                                 (op in COMMUTATIVE and (right, left) == (formula.left, formula.right)))


def first_fault(problem: Problem, answer: str):
    """Where a chain first goes wrong: ``None`` when every line and the answer are right, else
    ``(kind, line)`` with ``line`` 1-based (``None`` for ``"malformed"`` and ``"answer"``) and
    ``kind`` one of :data:`FAULTS`: ``malformed`` (no ``#`` or a body that is not whole 5-token
    lines), ``formula`` (the restated line is not a program formula still to compute), ``order``
    (a right formula whose operand is not computed yet), ``value`` (right formula, wrong value),
    ``answer`` (every line right, the token after ``#`` wrong). Used to diagnose where a decoder
    loses accuracy (scripts/poe_bridge_errors.py)."""
    toks = answer.split()
    if ANSWER not in toks:
        return ("malformed", None)
    body = toks[: toks.index(ANSWER)]
    if len(body) % 5:
        return ("malformed", None)
    by_target = {f.target: f for f in problem.formulas}
    vals, known = problem.values(), {n for n, _ in problem.inputs}
    for line, i in enumerate(range(0, len(body), 5), start=1):
        t, x, op, y, v = body[i: i + 5]
        f = by_target.get(t)
        if f is None or not restates(f, x, op, y) or t in known:
            return ("formula", line)
        if x not in known or y not in known:
            return ("order", line)
        if v != str(vals[t]):
            return ("value", line)
        known.add(t)
    if len(body) != 5 * len(problem.formulas):
        return ("malformed", None)
    return None if check_answer(problem, answer) else ("answer", None)


def score_texts(problems: Sequence[Problem], answers: Sequence[str]) -> List[bool]:
    return [check_answer(p, a) for p, a in zip(problems, answers)]
