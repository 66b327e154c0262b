"""PoE-Bridge decoder invariants on tiny random models (fast, no network, no training)."""

import copy

import pytest
import torch

import diffkern
from diffkern.poe_bridge import (MaskedLMDraft, PoEBridgeConfig, PoEBridgeDecoder, ar_generate,
                                 dlm_generate, speculative_generate)

V, EOS, MASK = 24, 2, 3
PROMPTS = [[1, 5, 6, 7], [1, 8, 9], [1, 10, 11, 12, 13, 14]]


def _models(seed=0):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    ar = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                    eos_token_id=EOS, bos_token_id=1, pad_token_id=0,
                                    attn_implementation="eager")).eval()
    dlm = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, eos_token_id=EOS,
                                     pad_token_id=0, attn_implementation="eager")).eval()
    return MaskedLMDraft(dlm, mask_token_id=MASK), ar


@pytest.fixture(scope="module")
def pair():
    return _models()


CFG = PoEBridgeConfig(window=4, max_lookahead=8, max_new_tokens=11, temperature=1.0, high_temperature=2.0)


def _fresh_last_logits(ar, ids):
    return ar(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits[0, -1]


def test_emitted_tokens_are_accepted_or_corrected_and_cache_matches_fresh_forward(pair):
    draft, ar = pair
    dec = PoEBridgeDecoder(draft, ar, CFG)
    seen = {"windows": 0, "corrections": 0}
    prev = {b: [] for b in range(len(PROMPTS))}

    def hook(s):
        res, drafts = s["result"], s["draft_tokens"]
        K = s["num_particles"]
        for b, (i, k, e) in s["selected"].items():
            new = s["generated"][b][len(prev[b]):]
            assert len(new) == e >= 1
            na, cor = int(res.num_accepted[i, k]), bool(res.corrected[i, k])
            assert new == res.tokens[i, k, :e].tolist()
            n_draft = min(na, e)
            assert new[:n_draft] == drafts[i, k, :n_draft].tolist()   # accepted drafts
            if e > na:                                              # the rest is the correction
                assert cor and e == na + 1
                seen["corrections"] += 1
            prev[b] = list(s["generated"][b])
        # the AR cache holds committed[:-1]: feeding the last committed token on top of it gives
        # the logits of a fresh forward over the whole committed prefix, for every particle row
        for b, c in enumerate(s["committed"]):
            if s["done"][b]:
                continue
            cache = copy.deepcopy(s["cache"])
            rows = torch.arange(b * K, (b + 1) * K)
            cache.batch_select_indices(rows)
            am = torch.cat([s["valid"][rows].long(), torch.ones(K, 1, dtype=torch.long)], 1)
            assert int(s["valid"][rows[0]].sum()) == len(c) - 1
            lg = ar(input_ids=torch.full((K, 1), c[-1]), attention_mask=am,
                    position_ids=torch.full((K, 1), len(c) - 1), past_key_values=cache).logits[:, -1]
            torch.testing.assert_close(lg, _fresh_last_logits(ar, c).expand_as(lg), atol=1e-4, rtol=1e-4)
        seen["windows"] += 1

    out = dec.generate(PROMPTS, seed=3, hook=hook, eos_token_id=EOS)
    assert seen["windows"] >= 3 and seen["corrections"] >= 1
    assert [len(s) for s in out.sequences] == [len(p) for p in prev.values()]
    st = out.stats
    assert st.num_sequences == 3 and st.dlm_forwards >= 3 and st.ar_forwards >= st.dlm_forwards
    assert st.new_tokens == sum(map(len, out.sequences))
    assert 0.0 <= st.acceptance_rate <= 1.0 and all(1.0 <= e <= CFG.num_particles + 1e-6 for e in st.ess)


def test_eos_stops_each_sequence(pair):
    draft, ar = pair
    dec = PoEBridgeDecoder(draft, ar, CFG)
    # every id but 23 ends a sequence: each must stop right after its first EOS
    out = dec.generate(PROMPTS, seed=0, eos_token_id=list(range(V - 1)))
    for s in out.sequences:
        assert 1 <= len(s) <= CFG.max_new_tokens
        assert all(t == V - 1 for t in s[:-1])
        assert s[-1] != V - 1 or len(s) == CFG.max_new_tokens
    # without EOS the budget is used exactly
    out = dec.generate(PROMPTS, seed=0, eos_token_id=[], max_new_tokens=7)
    assert [len(s) for s in out.sequences] == [7, 7, 7]


def test_batch_matches_structure_and_is_deterministic(pair):
    draft, ar = pair
    dec = PoEBridgeDecoder(draft, ar, CFG.replace(selection="argmax", weights="parity"))
    a = dec.generate(PROMPTS, seed=11, eos_token_id=EOS)
    b = dec.generate(PROMPTS, seed=11, eos_token_id=EOS)
    assert a.sequences == b.sequences
    # padded tensor input (right padding + attention_mask) is the same request
    P = max(map(len, PROMPTS))
    ids = torch.zeros(3, P, dtype=torch.long)
    am = torch.zeros(3, P, dtype=torch.long)
    for i, p in enumerate(PROMPTS):
        ids[i, : len(p)] = torch.tensor(p)
        am[i, : len(p)] = 1
    c = dec.generate(ids, am, seed=11, eos_token_id=EOS)
    assert c.sequences == a.sequences


def _cpu_poe_available():
    if not diffkern.backends()["cpu"].available:
        return False
    try:
        with diffkern.use_backend("cpu"):
            diffkern.ops.poe_draft(torch.zeros(1, 1, 4), torch.ones(1), seed=0)
            diffkern.ops.poe_verify(torch.zeros(1, 1, 4), torch.zeros(1, 1, 1, 4),
                                    torch.zeros(1, 1, 1, dtype=torch.long), torch.ones(1), weight=0.5, seed=0)
        return True
    except diffkern.BackendError:
        return False


@pytest.mark.skipif(not _cpu_poe_available(), reason="the C++ cpu backend of poe_draft/poe_verify is not built")
@pytest.mark.parametrize("weights", ["principled", "parity"])
def test_reference_and_fused_backends_give_identical_tokens(pair, weights):
    draft, ar = pair
    dec = PoEBridgeDecoder(draft, ar, CFG.replace(weights=weights, top_p=0.9))
    with diffkern.use_backend("reference"):
        ref = dec.generate(PROMPTS, seed=7, eos_token_id=EOS)
    with diffkern.use_backend("cpu"):
        fused = dec.generate(PROMPTS, seed=7, eos_token_id=EOS)
    assert ref.sequences == fused.sequences
    assert ref.stats.dlm_forwards == fused.stats.dlm_forwards


def test_speculative_is_weight0_single_particle(pair):
    draft, ar = pair
    out = speculative_generate(draft, ar, PROMPTS, config=CFG, seed=1, eos_token_id=EOS)
    assert all(e == 1.0 for e in out.stats.ess)
    ref = PoEBridgeDecoder(draft, ar, CFG.replace(weight=0.0, num_particles=1)).generate(PROMPTS, seed=1, eos_token_id=EOS)
    assert ref.sequences == out.sequences


def test_baselines_shapes_and_counts(pair):
    draft, ar = pair
    out = ar_generate(ar, PROMPTS, max_new_tokens=6, eos_token_id=[], seed=0)
    assert [len(s) for s in out.sequences] == [6, 6, 6] and out.stats.ar_forwards == 18
    for k in (1, 2, 4):
        out = dlm_generate(draft, PROMPTS, max_new_tokens=8, tokens_per_step=k, eos_token_id=[23], seed=0)
        assert all(MASK not in s for s in out.sequences)
        # without an EOS in the canvas: exactly ceil(8 / k) forwards per sequence
        if not any(23 in s for s in out.sequences):
            assert out.stats.dlm_forwards == 3 * -(-8 // k)
        assert out.stats.dlm_forwards <= 3 * -(-8 // k)


def test_shifted_draft_logits(pair):
    draft, _ = pair
    shifted = MaskedLMDraft(draft.model, mask_token_id=MASK, shifted=True)
    ids = torch.tensor([[1, 5, MASK, MASK]])
    a, b = draft.logits(ids), shifted.logits(ids)
    torch.testing.assert_close(b[:, 1:], a[:, :-1])


def test_bad_input_errors_name_the_argument(pair):
    draft, ar = pair
    with pytest.raises(ValueError, match="window"):
        PoEBridgeConfig(window=0)
    with pytest.raises(ValueError, match="selection"):
        PoEBridgeConfig(selection="best")
    with pytest.raises(ValueError, match="weights"):
        PoEBridgeConfig(weights="raw")
    with pytest.raises(ValueError, match="weight="):
        PoEBridgeConfig(weight=1.5)
    with pytest.raises(ValueError, match="n_low_temp"):
        PoEBridgeConfig(num_particles=2, n_low_temp=3)
    with pytest.raises(TypeError, match="config"):
        PoEBridgeDecoder(draft, ar, {"window": 4})
    dec = PoEBridgeDecoder(draft, ar, CFG)
    with pytest.raises(ValueError, match="input_ids"):
        dec.generate(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        dec.generate(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        dec.generate(PROMPTS, max_new_tokens=0)
    with pytest.raises(ValueError, match="tokens_per_step"):
        dlm_generate(draft, PROMPTS, tokens_per_step=0, eos_token_id=EOS)
    from transformers import GPT2Config, GPT2LMHeadModel
    other = GPT2LMHeadModel(GPT2Config(vocab_size=V + 5, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="vocabulary"):
        PoEBridgeDecoder(draft, other, CFG)
    PoEBridgeDecoder(draft, other, CFG.replace(vocab_size=V))  # explicit shared slice is allowed


def _old_advance_cache(self, run, win):
    """The decoder's former cache step: gather every row to its winner, then crop the tail."""
    if not torch.equal(win.select, torch.arange(len(win.select))):
        run.cache.batch_select_indices(win.select)
    valid = torch.cat([run.valid[win.select], win.new_valid], dim=1)
    used = valid.any(dim=0).nonzero()
    keep = int(used.max()) + 1 if used.numel() else 0
    self.target.crop(run.cache, keep)
    run.valid = valid[:, :keep]


@pytest.mark.parametrize("row_copy", [True, False])
def test_row_copy_cache_step_equals_a_full_gather_bit_for_bit(pair, row_copy, monkeypatch):
    """Cropping first and copying only the moved rows from the per-sequence synced position
    leaves exactly the cache (and tokens) of gathering every row then cropping."""
    draft, ar = pair
    prompts = PROMPTS + [[1, 15], [1, 16, 17, 18, 19, 20, 21, 22]]
    cfg = CFG.replace(num_particles=4, max_new_tokens=14)

    def run(dec):
        snaps = []

        def hook(s):
            snaps.append(([(layer.keys.clone(), layer.values.clone()) for layer in s["cache"].layers],
                          s["valid"].clone()))
        out = dec.generate(prompts, seed=5, hook=hook, eos_token_id=EOS)
        return out, snaps

    new = PoEBridgeDecoder(draft, ar, cfg)
    new.target.row_copy = row_copy
    starts = []
    orig = type(new.target).copy_rows

    def spy(self, cache, dst, src, start):
        done = orig(self, cache, dst, src, start)
        starts.append((start, done))
        return done
    monkeypatch.setattr(type(new.target), "copy_rows", spy)
    out_new, snaps_new = run(new)
    monkeypatch.undo()

    old = PoEBridgeDecoder(draft, ar, cfg)
    monkeypatch.setattr(PoEBridgeDecoder, "_advance_cache", _old_advance_cache)
    out_old, snaps_old = run(old)

    assert out_new.sequences == out_old.sequences
    assert len(snaps_new) == len(snaps_old) >= 5
    for (layers_n, valid_n), (layers_o, valid_o) in zip(snaps_new, snaps_old):
        assert torch.equal(valid_n, valid_o)
        for (kn, vn), (ko, vo) in zip(layers_n, layers_o):
            assert torch.equal(kn, ko) and torch.equal(vn, vo)
    # the row copy ran (or declined, when disabled), also from positions past 0
    assert starts and all(done == row_copy for _, done in starts)
    assert any(start > 0 for start, _ in starts)
