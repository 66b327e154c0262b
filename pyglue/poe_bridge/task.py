"""Synthetic task for the shipped PoE-Bridge model pair: *sort a set of letters*.

Prompt: ``[BOS] c a e b =``. A valid answer lists every letter of the set exactly once, sorted
either ascending or descending, separated by one separator used consistently (``,`` or ``;``),
then ``[EOS]``. The four valid forms of ``c a e b`` are::

    a , b , c , e      a ; b ; c ; e      e , c , b , a      e ; c ; b ; a

The direction and the separator are global choices that every answer token depends on, so a
decoder that fills positions independently (parallel DLM unmasking) mixes forms and fails, while
left-to-right decoding commits to one form. :func:`check_answer` is exact.

Held-out problems: a letter set is held out when a stable hash of it falls in one bucket of ten;
training never sees those sets (in any prompt order).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Iterable, List, Sequence

LETTERS = [chr(ord("a") + i) for i in range(16)]
SEPARATORS = (",", ";")
PROMPT_END = "="
SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]", "[UNK]"]
VOCAB = SPECIAL_TOKENS + LETTERS + list(SEPARATORS) + [PROMPT_END]
MIN_SIZE, MAX_SIZE = 3, 7
#: Longest answer in tokens, EOS included (7 letters, 6 separators, EOS).
MAX_ANSWER_TOKENS = 2 * MAX_SIZE
#: Generation budget used for the shipped models (the DLM is trained on this canvas).
MAX_NEW_TOKENS = 16


@dataclass(frozen=True)
class Problem:
    letters: tuple  # the prompt order

    @property
    def prompt(self) -> str:
        return " ".join(self.letters) + " " + PROMPT_END

    def answers(self) -> List[str]:
        """All valid answers (without EOS)."""
        out = []
        for reverse in (False, True):
            order = sorted(self.letters, reverse=reverse)
            for sep in SEPARATORS:
                out.append(f" {sep} ".join(order))
        return out


def is_held_out(letters: Iterable[str]) -> bool:
    key = "".join(sorted(letters)).encode()
    return zlib.crc32(key) % 10 == 0


def sample_problem(rng: random.Random, held_out: bool) -> Problem:
    while True:
        size = rng.randint(MIN_SIZE, MAX_SIZE)
        letters = rng.sample(LETTERS, size)
        if is_held_out(letters) == held_out:
            return Problem(tuple(letters))


def sample_answer(problem: Problem, rng: random.Random) -> str:
    return rng.choice(problem.answers())


def held_out_problems(n: int, seed: int = 1234) -> List[Problem]:
    """``n`` distinct held-out problems (deterministic)."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = sample_problem(rng, held_out=True)
        key = frozenset(p.letters)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def check_answer(problem: Problem, answer: str) -> bool:
    """Exact checker: ``answer`` (text after the prompt, EOS and later removed) is valid."""
    toks = answer.split()
    if len(toks) != 2 * len(problem.letters) - 1:
        return False
    letters, seps = toks[0::2], toks[1::2]
    if seps and (seps[0] not in SEPARATORS or any(s != seps[0] for s in seps)):
        return False
    return letters in (sorted(problem.letters), sorted(problem.letters, reverse=True))


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def build_tokenizer(vocab_tokens: Sequence[str] = tuple(VOCAB)):
    """A word-level ``PreTrainedTokenizerFast`` over ``vocab_tokens`` (default :data:`VOCAB`;
    whitespace-separated; the first five must be :data:`SPECIAL_TOKENS`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if list(vocab_tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise ValueError(f"vocab_tokens: must start with {SPECIAL_TOKENS}, got {list(vocab_tokens[:5])}")
    vocab = {tok: i for i, tok in enumerate(vocab_tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]", pad_token="[PAD]",
        mask_token="[MASK]", unk_token="[UNK]", clean_up_tokenization_spaces=False)


def encode_prompt(tokenizer, problem: Problem) -> List[int]:
    return tokenizer(problem.prompt)["input_ids"]


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """Text of generated ids, cut at the first EOS, special tokens dropped."""
    ids = list(ids)
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def score(tokenizer, problems: Sequence[Problem], generations: Sequence[Sequence[int]]) -> float:
    """Fraction of problems whose generation passes :func:`check_answer`."""
    if len(problems) != len(generations):
        raise ValueError(f"score: {len(problems)} problems but {len(generations)} generations")
    ok = sum(check_answer(p, decode_answer(tokenizer, g)) for p, g in zip(problems, generations))
    return ok / max(1, len(problems))
