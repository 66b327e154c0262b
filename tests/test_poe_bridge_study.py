"""The PoE-Bridge study (issue 13): its tasks, baselines, statistics and the demo's JSON contract.
Tiny random models or the shipped pairs; no training."""

import collections
import copy
import json
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from diffkern import ops  # noqa: E402
from diffkern.poe_bridge import (PoEBridgeConfig, PoEBridgeDecoder, is_only_generate,  # noqa: E402
                                 load_shipped, modchain, reorganize, speculative_generate, study, tasks)

from test_poe_bridge_decoder import EOS, V, _models as tiny_pair  # noqa: E402


def _models(seed=0):
    """The decoder tests' tiny random pair, with a sharper AR head so that the two models'
    distributions differ clearly."""
    draft, ar = tiny_pair(seed)
    with torch.no_grad():
        ar.lm_head.weight.mul_(4.0)
    return draft, ar


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return _models()


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------

def test_modchain_answers_check_and_styles_differ():
    rng = random.Random(0)
    problems = [modchain.sample_problem(rng) for _ in range(200)]
    first_listed = {"ar": 0, "dlm": 0}
    for p in problems:
        assert modchain.count_orders(p) >= 2
        for style in ("ar", "dlm"):
            ans = modchain.sample_answer(p, rng, style)
            assert modchain.check_answer(p, ans) and modchain.chain_is_consistent(p, ans)
            assert len(ans.split()) == 5 * len(p.formulas) + 2      # both styles: same length
            listed = [f.target for f in p.formulas]
            ready = [f.target for f in p.formulas if f.left not in listed and f.right not in listed]
            first_listed[style] += ans.split()[0] == min(ready, key=listed.index)
        wrong = modchain.sample_answer(p, rng)[:-1] + str((p.value + 1) % modchain.MODULUS)
        assert not modchain.check_answer(p, wrong)
    # the AR corpus mostly starts with the earliest-listed ready line, the DLM corpus mostly not
    assert first_listed["ar"] > 160 and first_listed["dlm"] < 60


def test_modchain_style_points():
    """The shipped corpora differ in line order only: both restate every formula as the prompt
    lists it. With the operand-order point on (calibration attempts 1-3) they differ there too."""
    assert modchain.STYLE_POINTS == ("order",)
    rng = random.Random(1)
    problems = [modchain.sample_problem(rng) for _ in range(200)]

    def kept_order(p, ans):
        by_target = {f.target: f for f in p.formulas}
        toks = ans.split()
        lines = [toks[i: i + 5] for i in range(0, 5 * len(p.formulas), 5)]
        return [(x, y) == (by_target[t].left, by_target[t].right) for t, x, op, y, _ in lines if op in "+*"]

    kept = {(style, points): [] for style in ("ar", "dlm") for points in (("order",), ("order", "operands"))}
    for p in problems:
        for style, points in kept:
            ans = modchain.sample_answer(p, rng, style, points)
            assert modchain.chain_is_consistent(p, ans)
            kept[style, points] += kept_order(p, ans)
        assert all(kept_order(p, modchain.sample_answer(p, rng, "dlm")))   # the default: as listed
    assert all(kept["ar", ("order",)]) and all(kept["dlm", ("order",)])
    mean = {k: sum(v) / len(v) for k, v in kept.items()}
    assert mean["ar", ("order", "operands")] > 0.8 and mean["dlm", ("order", "operands")] < 0.2
    with pytest.raises(ValueError, match="style_points"):
        modchain.sample_answer(problems[0], rng, "ar", ("operand",))
    p = modchain.Problem((("a", 3), ("b", 2)), (modchain.Formula("d", "c", "-", "a"),
                                                modchain.Formula("c", "a", "*", "b")), "d")
    assert modchain.MODULUS == 5 and p.value == (3 * 2 - 3) % 5
    assert modchain.chain_is_consistent(p, "c b * a 1 d c - a 3 # 3")
    assert not modchain.chain_is_consistent(p, "c b * a 1 d a - c 3 # 3")   # '-' is not commutative
    assert not modchain.chain_is_consistent(p, "d c - a 3 c b * a 1 # 3")   # d before its operand c
    assert not modchain.check_answer(p, "c a * b 1 d c - a 3 #")


def test_first_fault_locates_where_a_chain_goes_wrong():
    p = modchain.Problem((("a", 3), ("b", 2)), (modchain.Formula("d", "c", "-", "a"),
                                                modchain.Formula("c", "a", "*", "b")), "d")
    cases = {"c b * a 1 d c - a 3 # 3": None,
             "c a * b 1 d c - a 3 # 4": ("answer", None),
             "c a * b 2 d c - a 4 # 4": ("value", 1),           # 3 * 2 = 1 mod 5, and the error carries on
             "c a * b 1 d c - a 2 # 2": ("value", 2),
             "c a * b 1 d a - c 3 # 3": ("formula", 2),         # '-' is not commutative
             "c a + b 0 d c - a 2 # 2": ("formula", 1),         # a wrong operator
             "c a * b 1 c a * b 1 # 1": ("formula", 2),         # c restated twice
             "d c - a 3 c b * a 1 # 3": ("order", 1),           # d before its operand c
             "c a * b 1 # 1": ("malformed", None),              # a line missing
             "c a * b 1 d c - a 3 3": ("malformed", None),      # no '#'
             "c a * b 1 d c - # 3": ("malformed", None)}        # not whole lines
    for answer, fault in cases.items():
        assert modchain.first_fault(p, answer) == fault, answer
        assert modchain.chain_is_consistent(p, answer) == (fault is None)


def test_held_out_splits_are_disjoint_from_training():
    for name in ("modchain", "reorganize"):
        spec = tasks.get(name)
        test = spec.problems(50, 1234, "test")
        val = spec.problems(50, 99, "validation")
        assert len({p.prompt for p in test}) == 50
        assert not {p.prompt for p in test} & {p.prompt for p in val}
        rng = random.Random(1)
        train = {spec.train_problem(rng).prompt for _ in range(300)}
        assert not train & {p.prompt for p in test + val}
    with pytest.raises(ValueError, match="split"):
        modchain.sample_problem(random.Random(0), "dev")
    with pytest.raises(ValueError, match="task"):
        tasks.get("gsm8k")


def test_reorganize_feasibility_matches_brute_force():
    import itertools
    rng = random.Random(0)
    for _ in range(40):
        letters = tuple(sorted(rng.choice("abc") for _ in range(rng.randint(3, 7))))
        brute = any(all(x != y for x, y in zip(p, p[1:])) for p in set(itertools.permutations(letters)))
        assert reorganize.arrangeable(reorganize._counts(letters), -1) == brute
    p = reorganize.sample_problem(rng, "test")
    for style in ("ar", "dlm"):
        assert reorganize.check_answer(p, reorganize.sample_answer(p, rng, style))
    assert not reorganize.check_answer(reorganize.Problem(("a", "a", "b")), "a a b")
    assert not reorganize.check_answer(reorganize.Problem(("a", "a", "b")), "a b")


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------

def test_is_only_is_weight_one_semantics():
    """w = 1 and top-p 1: every draft is accepted and the log-weight is sum(log p_AR,T* - log q)."""
    g = torch.Generator().manual_seed(0)
    B, K, W, Vs = 2, 3, 5, 11
    dlm = torch.randn(B, W, Vs, generator=g) * 2
    ar = torch.randn(B, K, W, Vs, generator=g) * 2
    temps = torch.tensor([0.5, 1.0, 1.5])
    drafts, _ = ops.poe_draft(dlm, temps, top_p=1.0, seed=3)
    res = ops.poe_verify(dlm, ar, drafts, temps, weight=1.0, top_p=1.0, target_temperature=0.7, seed=3)
    assert bool((res.num_accepted == W).all()) and not bool(res.corrected.any())
    assert torch.equal(res.tokens, drafts)
    T = temps[None, :, None, None]
    log_q = torch.log_softmax(dlm.double()[:, None] / T.double(), -1)
    log_a = torch.log_softmax(ar.double() / 0.7, -1)
    idx = drafts[..., None]
    expect = (log_a.gather(-1, idx) - log_q.expand_as(log_a).gather(-1, idx)).squeeze(-1).sum(-1)
    torch.testing.assert_close(res.log_weights.double(), expect, atol=1e-4, rtol=1e-4)


def test_is_only_generate_accepts_every_draft(pair):
    draft, ar = pair
    cfg = PoEBridgeConfig(window=4, max_lookahead=8, max_new_tokens=9, temperature=1.0, top_p=0.9)
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10]]
    out = is_only_generate(draft, ar, prompts, config=cfg, seed=2, eos_token_id=EOS)
    assert out.stats.acceptance_rate == 1.0 and out.stats.accepted == out.stats.drafted > 0
    # one DLM forward drafts the whole lookahead: <= ceil(9 / 8) forwards per sequence
    assert all(f <= 2 for f in out.stats.seq_dlm_forwards)
    same = PoEBridgeDecoder(draft, ar, cfg.replace(weight=1.0, top_p=1.0)).generate(prompts, seed=2,
                                                                                     eos_token_id=EOS)
    assert same.sequences == out.sequences


def _exact_two_token_distribution(ar, prompt, T):
    """p_AR,T over the outcomes of two new tokens (a lone EOS ends the sequence)."""
    with torch.no_grad():
        first = torch.softmax(ar(input_ids=torch.tensor([prompt])).logits[0, -1].double() / T, -1)
        ids = torch.tensor([prompt + [t] for t in range(V)])
        second = torch.softmax(ar(input_ids=ids).logits[:, -1].double() / T, -1)
    dist = {}
    for a in range(V):
        if a == EOS:
            dist[(a,)] = float(first[a])
            continue
        for b in range(V):
            dist[(a, b)] = float(first[a] * second[a, b])
    return dist


def _chi_square_p(counts, dist, n):
    from scipy.stats import chi2
    exp = {k: v * n for k, v in dist.items()}
    big = [k for k, e in exp.items() if e >= 5]
    small_e = sum(e for k, e in exp.items() if e < 5)
    small_o = sum(c for k, c in counts.items() if k not in set(big))
    stat = sum((counts.get(k, 0) - exp[k]) ** 2 / exp[k] for k in big)
    bins = len(big)
    if small_e > 0:
        stat += (small_o - small_e) ** 2 / small_e
        bins += 1
    return chi2.sf(stat, bins - 1)


def test_speculative_outputs_follow_the_ar_distribution(pair):
    """Chi-square over the first two tokens of a short prompt: speculative decoding (w = 0, K = 1,
    top-p 1) is lossless, while the DLM's own samples (importance sampling at K = 1: no
    reweighting) are rejected by the same test - so the test has power."""
    draft, ar = pair
    prompt, T, n = [1, 5, 6], 1.0, 4000
    dist = _exact_two_token_distribution(ar, prompt, T)
    cfg = PoEBridgeConfig(window=2, max_lookahead=2, max_new_tokens=2, temperature=T, top_p=1.0)
    out = speculative_generate(draft, ar, [prompt] * n, config=cfg, seed=5, eos_token_id=EOS)
    assert out.stats.acceptance_rate < 0.9       # the DLM's drafts are really corrected
    counts = collections.Counter(tuple(s) for s in out.sequences)
    assert _chi_square_p(counts, dist, n) > 1e-3
    dlm_only = is_only_generate(draft, ar, [prompt] * n, config=cfg.replace(num_particles=1), seed=5,
                                eos_token_id=EOS)
    counts = collections.Counter(tuple(s) for s in dlm_only.sequences)
    assert _chi_square_p(counts, dist, n) < 1e-6


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------

def _measured(method, correct, dlm_f, seeds=2, weight=None, particles=None):
    m = study.Measured(study.Setting(method, weight, particles, None))
    for s in range(seeds):
        fields = {f: np.ones(len(correct)) for f in study.FIELDS}
        fields["correct"] = np.array(correct, float)
        fields["dlm_forwards"] = np.array(dlm_f, float)
        m.per_seed[s] = fields
        m.seconds[s] = 1.0
    return m


def test_wilson_and_pooled_ratio_metrics():
    lo, hi = study.wilson(8, 10)
    assert 0.490 < lo < 0.491 and 0.943 < hi < 0.944      # Wilson 8/10: (0.4902, 0.9433)
    assert study.wilson(0, 10)[0] == 0.0 and study.wilson(10, 10)[1] == pytest.approx(1.0)
    a = _measured("x", [1, 0, 1, 1], [2, 4, 6, 8])
    assert study.metric(a, "accuracy") == 0.75 and study.metric(a, "dlm_forwards") == 5.0
    assert study.metric(a, "tokens_per_dlm_forward") == pytest.approx(8 / 40)
    boot = study.Bootstrap(4, resamples=500)
    lo, hi = boot.interval(lambda idx: study.metric(a, "accuracy", idx))
    assert 0.0 <= lo < 0.75 < hi <= 1.0
    # paired: identical methods give a zero-width difference interval
    assert boot.interval(lambda idx: study.metric(a, "accuracy", idx) - study.metric(a, "accuracy", idx)) == [0, 0]
    row = study.row("t", a, seed=1)
    assert row["seed"] == 1 and row["accuracy"] == 0.75 and len(row["accuracy_ci"]) == 2


# ---------------------------------------------------------------------------------------------
# Shipped pairs: the demo's JSON contract, ragged batches on the ModChain pair
# ---------------------------------------------------------------------------------------------

ROW_KEYS = {"task", "method", "weight", "particles", "seed", "accuracy", "accuracy_ci", "dlm_forwards",
            "ar_forwards", "tokens_per_dlm_forward", "acceptance", "ess_over_k", "ar_nll",
            "seconds_per_problem", "backend"}


def test_demo_json_schema(tmp_path):
    import argparse
    from diffkern.poe_bridge import demo
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    path, png = tmp_path / "study.json", tmp_path / "study.png"
    args = parser.parse_args(["--task", "letter-sort", "--num-problems", "3", "--seeds", "2", "--batch-size", "3",
                              "--sweep-particles", "4", "8", "--is-particles", "--json", str(path),
                              "--png", str(png)])
    assert demo.run(args) == 0
    doc = json.loads(path.read_text())
    assert set(doc) >= {"rows", "claims"}
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["task"] == "letter-sort" and r["seed"] in (0, 1)
        assert 0.0 <= r["accuracy_ci"][0] <= r["accuracy"] <= r["accuracy_ci"][1] <= 1.0
    methods = collections.Counter(r["method"] for r in doc["rows"])
    for m in ("ar", "dlm-1", "dlm-2", "dlm-4", "dlm-matched", "speculative", "is-only", "poe-bridge", "official"):
        assert methods[m] >= 2, m                                       # one row per seed
    is4 = [r for r in doc["rows"] if r["method"] == "is-only" and r["particles"] == 4]
    assert is4 and all(r["acceptance"] == 1.0 and r["weight"] == 1.0 for r in is4)
    names = {c["name"] for c in doc["claims"]}
    assert {"accuracy_ratio_vs_ar", "dlm_forward_reduction_vs_dlm1", "accuracy_gain_vs_is_only_k8",
            "acceptance_non_decreasing_in_w"} <= names
    for c in doc["claims"]:
        assert set(c) >= {"name", "holds", "value", "interval"} and isinstance(c["holds"], bool)
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="num-problems"):
        demo.run(parser.parse_args(["--num-problems", "0"]))


@pytest.mark.skipif(not all((tasks.get("modchain").asset_dir / m / "config.json").exists() for m in ("ar", "dlm")),
                    reason="the ModChain pair is not built (scripts/train_poe_bridge_models.py --task modchain)")
def test_ragged_batch_on_the_modchain_pair():
    """B > 1 prompts of different lengths: every sequence is a well-formed, EOS-terminated answer,
    the AR cache matches a fresh forward after every window, and the batch decodes as accurately
    as the same prompts one at a time (same models, same settings)."""
    torch.set_num_threads(1)
    tok, draft, ar = load_shipped("modchain")
    spec = tasks.get("modchain")
    problems = spec.problems(12, 1234, "test")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    assert len({len(p) for p in prompts}) >= 2                          # ragged
    cfg = PoEBridgeConfig(window=4, max_lookahead=20, max_new_tokens=spec.max_new_tokens, weight=0.7)
    dec = PoEBridgeDecoder(draft, ar, cfg)
    checked = {"windows": 0}

    def hook(s):
        K = s["num_particles"]
        for b, c in enumerate(s["committed"]):
            if s["done"][b] or b % 5:
                continue
            cache = copy.deepcopy(s["cache"])
            rows = torch.arange(b * K, (b + 1) * K)
            cache.batch_select_indices(rows)
            am = torch.cat([s["valid"][rows].long(), torch.ones(K, 1, dtype=torch.long)], 1)
            lg = ar(input_ids=torch.full((K, 1), c[-1]), attention_mask=am,
                    position_ids=torch.full((K, 1), len(c) - 1), past_key_values=cache).logits[:, -1]
            fresh = ar(input_ids=torch.tensor([c])).logits[0, -1]
            torch.testing.assert_close(lg, fresh.expand_as(lg), atol=1e-4, rtol=1e-4)
        checked["windows"] += 1

    batch = dec.generate(prompts, seed=0, eos_token_id=tok.eos_token_id, hook=hook)
    assert checked["windows"] >= 3
    for s in batch.sequences:
        assert s.count(tok.eos_token_id) == 1 and s[-1] == tok.eos_token_id
    single = [dec.generate([p], seed=0, eos_token_id=tok.eos_token_id).sequences[0] for p in prompts]
    acc_batch = sum(spec.score(tok, problems, batch.sequences)) / len(problems)
    acc_single = sum(spec.score(tok, problems, single)) / len(problems)
    assert acc_batch >= 0.5 and abs(acc_batch - acc_single) <= 0.25


@pytest.mark.skipif(not all((tasks.get("modchain").asset_dir / m / "config.json").exists() for m in ("ar", "dlm")),
                    reason="the ModChain pair is not built (scripts/train_poe_bridge_models.py --task modchain)")
def test_error_script_classifies_the_demos_own_answers(capsys):
    """scripts/poe_bridge_errors.py decodes with the demo's settings and seeds: its accuracy per
    setting is the demo's (the checker's) and its fault rates account for every wrong answer."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "poe_bridge_errors.py"
    spec_ = importlib.util.spec_from_file_location("poe_bridge_errors", path)
    script = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(script)
    torch.set_num_threads(1)
    assert script.main(["--num-problems", "6", "--seeds", "1", "--batch-size", "3", "--settings", "speculative"]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith(("ar ", "spec"))}
    assert set(lines) == {"ar", "speculative"}
    for cols in lines.values():
        acc, rates, lucky = float(cols[1]), [float(c) for c in cols[2:13]], float(cols[13])
        assert abs((1 - acc) * 100 - (sum(rates) - lucky)) < 0.7        # wrong = faulty chains - lucky ones (rounded)
    with pytest.raises(SystemExit):
        script.main(["--settings", "poe-bridge w=0.9 K=4"])
