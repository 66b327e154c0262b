"""The shipped tiny model pair and the synthetic task (loaded offline with from_pretrained)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffkern.poe_bridge import (PoEBridgeConfig, PoEBridgeDecoder, ar_generate, dlm_generate,  # noqa: E402
                                 load_shipped, task)


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(1)
    return load_shipped()


@pytest.fixture(scope="module")
def problems():
    return task.held_out_problems(16)


def test_checker_and_held_out_split():
    p = task.Problem(("c", "a", "e", "b"))
    for a in p.answers():
        assert task.check_answer(p, a)
    assert len(set(p.answers())) == 4
    for bad in ["a , b , c", "a , b ; c , e", "a , c , b , e", "e , c , b , a , a", "a ; b ; c ; e ;", ""]:
        assert not task.check_answer(p, bad)
    held = task.held_out_problems(50)
    assert all(task.is_held_out(q.letters) for q in held)
    assert len({frozenset(q.letters) for q in held}) == 50


def test_shipped_pair_shares_tokenizer(shipped):
    tok, draft, ar = shipped
    assert draft.vocab_size == ar.config.vocab_size == len(tok)
    assert draft.mask_token_id == tok.mask_token_id
    ids = tok(task.Problem(("c", "a")).prompt)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "c a ="


def test_shipped_pair_poe_bridge_solves_held_out_problems(shipped, problems):
    tok, draft, ar = shipped
    prompts = [task.encode_prompt(tok, p) for p in problems]
    cfg = PoEBridgeConfig(window=8, max_lookahead=16, max_new_tokens=task.MAX_NEW_TOKENS)
    out = PoEBridgeDecoder(draft, ar, cfg).generate(prompts, seed=0, eos_token_id=tok.eos_token_id)
    acc = task.score(tok, problems, out.sequences)
    assert acc >= 0.85, acc
    for s in out.sequences:  # EOS ends each sequence
        assert s.count(tok.eos_token_id) == 1 and s[-1] == tok.eos_token_id
    dlm1 = dlm_generate(draft, prompts, max_new_tokens=task.MAX_NEW_TOKENS, tokens_per_step=1, seed=0,
                        eos_token_id=tok.eos_token_id)
    # PoE-Bridge needs far fewer DLM forwards than one-token-per-step DLM decoding
    assert out.stats.dlm_forwards * 3 <= dlm1.stats.dlm_forwards
    arr = ar_generate(ar, prompts, max_new_tokens=task.MAX_NEW_TOKENS, seed=0, eos_token_id=tok.eos_token_id)
    assert task.score(tok, problems, arr.sequences) >= 0.85


def test_parallel_dlm_decoding_mixes_forms(shipped, problems):
    tok, draft, _ = shipped
    prompts = [task.encode_prompt(tok, p) for p in problems]
    out = dlm_generate(draft, prompts, max_new_tokens=task.MAX_NEW_TOKENS, tokens_per_step=8, seed=0,
                       eos_token_id=tok.eos_token_id)
    assert task.score(tok, problems, out.sequences) <= 0.6
