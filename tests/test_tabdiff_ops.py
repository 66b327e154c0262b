"""The tabdiff_* operator family (diffkern.ops.tabdiff) against direct torch computations of the
sampler's formulas, its categorical unmask sampler against the exact distribution, its random
streams (Philox keyed by seed, step, row, column) and its argument checks."""

import math

import pytest
import torch

import diffkern
from diffkern.ops import philox
from diffkern.ops import tabdiff as td

scipy_stats = pytest.importorskip("scipy.stats")

K = [3, 1, 5]                       # classes per categorical column (index K_j is its MASK)
L = sum(K) + len(K)


def _state(B=6, n=2, seed=0, masked=0.5):
    g = torch.Generator().manual_seed(seed)
    x_num = torch.randn(B, n, generator=g, dtype=torch.float64)
    x_cat = torch.stack([torch.randint(0, k, (B,), generator=g) for k in K], dim=1)
    mask = torch.rand(B, len(K), generator=g) < masked
    x_cat = torch.where(mask, torch.tensor(K).expand(B, -1), x_cat)
    logits = torch.randn(B, L, generator=g, dtype=torch.float64) * 2
    return x_num, x_cat, logits


def test_segment_offsets():
    assert td.segment_offsets(K) == [0, 4, 6]
    assert td.segment_offsets([]) == []


def test_churn_matches_formula():
    x_num, x_cat, _ = _state()
    sigma_cur, sigma_hat = torch.tensor([0.5, 2.0], dtype=torch.float64), torch.tensor([0.7, 2.0], dtype=torch.float64)
    chance = torch.tensor([0.3, 0.0, 1.0], dtype=torch.float64)
    noise = torch.randn(6, 2, dtype=torch.float64)
    u = torch.rand(6, 3, dtype=torch.float64)
    x_hat, x_cat_hat = diffkern.ops.tabdiff_churn(x_num, x_cat, sigma_cur, sigma_hat, chance, K, seed=0, step=3,
                                                 noise=noise, uniforms=u)
    torch.testing.assert_close(x_hat, x_num + (sigma_hat ** 2 - sigma_cur ** 2).sqrt() * noise)
    expect = torch.where(u < chance, torch.tensor(K).expand(6, -1), x_cat)
    assert torch.equal(x_cat_hat, expect)
    assert bool((x_cat_hat[:, 2] == K[2]).all()) and torch.equal(x_cat_hat[:, 1], x_cat[:, 1])


def test_step_euler_and_unmask_with_explicit_uniforms():
    x_num, x_cat, logits = _state(B=8)
    denoised = torch.randn_like(x_num)
    sh, sn = torch.tensor([3.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    at, as_ = torch.tensor([0.2, 0.5, 0.0], dtype=torch.float64), torch.tensor([0.6, 0.9, 0.3], dtype=torch.float64)
    u = torch.rand(8, L, dtype=torch.float64)
    x_next, x_cat_next, d = diffkern.ops.tabdiff_step(x_num, x_cat, denoised, logits, sh, sn, K, at, as_,
                                                      seed=0, step=0, uniforms=u)
    torch.testing.assert_close(d, (x_num - denoised) / sh)
    torch.testing.assert_close(x_next, x_num + (sn - sh) * d)
    for b in range(8):
        for j, (start, k) in enumerate(zip(td.segment_offsets(K), K)):
            if int(x_cat[b, j]) != k:
                assert int(x_cat_next[b, j]) == int(x_cat[b, j])      # decoded entries are kept
                continue
            p = torch.softmax(logits[b, start:start + k], 0)
            q = torch.cat([p * (as_[j] - at[j]), (1 - as_[j]).view(1)])
            race = [float(q[i]) / (1e-10 - math.log(float(u[b, start + i]) + 1e-10)) for i in range(k + 1)]
            assert int(x_cat_next[b, j]) == max(range(k + 1), key=lambda i: (race[i], -i))


def test_unmask_follows_exact_distribution():
    """One fully masked column: P(class c) = p_c (a_s - a_t) / (1 - a_t), P(MASK) = (1 - a_s) / (1 - a_t)."""
    B, k = 40_000, 4
    logits = torch.tensor([[1.0, -0.5, 0.3, 2.0, 7.0]], dtype=torch.float64).expand(B, -1)   # MASK logit ignored
    x_cat = torch.full((B, 1), k)
    at, as_ = torch.tensor([0.1], dtype=torch.float64), torch.tensor([0.7], dtype=torch.float64)
    z = torch.zeros(B, 0, dtype=torch.float64)
    _, drawn, _ = diffkern.ops.tabdiff_step(z, x_cat, z, logits, [], [], [k], at, as_, seed=11, step=4)
    p = torch.softmax(logits[0, :k], 0)
    expect = torch.cat([p * (as_ - at), 1 - as_]) / (1 - at)
    counts = torch.bincount(drawn[:, 0], minlength=k + 1).double()
    stat, pvalue = scipy_stats.chisquare(counts.numpy(), (expect * B).numpy())
    assert pvalue > 1e-4, (counts / B, expect)
    # a wrong distribution (the MASK logit left in) is rejected by the same test
    wrong = torch.softmax(logits[0], 0) * as_
    wrong = torch.cat([wrong[:k], (1 - as_) + wrong[k:]]) / wrong.new_tensor(float(wrong[:k].sum() + 1 - as_))
    assert scipy_stats.chisquare(counts.numpy(), (wrong / wrong.sum() * B).numpy())[1] < 1e-6


def test_last_step_leaves_no_mask():
    x_num, x_cat, logits = _state(B=64, masked=1.0)
    ones = torch.ones(3, dtype=torch.float64)
    _, out, _ = diffkern.ops.tabdiff_step(x_num, x_cat, x_num, logits, [1.0, 1.0], [0.0, 0.0], K, ones * 0.4, ones,
                                          seed=1, step=0)
    assert bool((out < torch.tensor(K)).all())


def test_streams_are_the_reference_uniforms_and_batch_invariant():
    x_num, x_cat, logits = _state(B=10, masked=0.9)
    args = (x_num, x_cat, x_num * 0.5, logits, [2.0, 2.0], [1.0, 1.0], K, [0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    whole = diffkern.ops.tabdiff_step(*args, seed=5, step=7, row_start=100)
    explicit = diffkern.ops.tabdiff_step(*args, seed=5, step=7, uniforms=td.unmask_uniforms(5, 7, 100, 10, L))
    assert torch.equal(whole[1], explicit[1])
    halves = [diffkern.ops.tabdiff_step(x_num[s], x_cat[s], x_num[s] * 0.5, logits[s], *args[4:], seed=5, step=7,
                                        row_start=100 + s.start) for s in (slice(0, 4), slice(4, 10))]
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])
    other_step = diffkern.ops.tabdiff_step(*args, seed=5, step=8, row_start=100)
    assert not torch.equal(other_step[1], whole[1]) or bool((x_cat < torch.tensor(K)).all())
    # the streams are the spec's (torch) Philox bits, whichever implementation drew them
    spec = philox.uniform(5, 7, philox.TAGS["tabdiff_unmask"], torch.arange(100, 110).view(-1, 1),
                          torch.arange(L).view(1, -1))
    assert torch.equal(td.unmask_uniforms(5, 7, 100, 10, L), spec)
    # the four streams are distinct Philox tags
    tags = {philox.TAGS[t] for t in ("tabdiff_churn", "tabdiff_remask", "tabdiff_unmask", "tabdiff_observed")}
    assert len(tags) == 4


def test_heun_and_guide_formulas():
    g = torch.Generator().manual_seed(3)
    x_hat, x_next, den, d = (torch.randn(5, 2, generator=g) for _ in range(4))
    sh, sn = torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.5])
    out = diffkern.ops.tabdiff_heun(x_hat, x_next, den, d, sh, sn)
    torch.testing.assert_close(out, x_hat + (sn - sh) * (d + (x_next - den) / sn) / 2)
    cond, uncond = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    torch.testing.assert_close(diffkern.ops.tabdiff_guide(cond, uncond, 0.6), 1.6 * cond - 0.6 * uncond)
    with pytest.raises(ValueError, match="sigma_next"):
        diffkern.ops.tabdiff_heun(x_hat, x_next, den, d, sh, torch.tensor([1.0, 0.0]))


def test_guided_logits_are_product_of_experts():
    """The categorical guidance (1+w) cond - w uncond on raw logits is product_of_experts(1+w, -w)."""
    g = torch.Generator().manual_seed(4)
    cond, uncond = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    out = diffkern.ops.product_of_experts([cond, uncond], [1.6, -0.6])
    ref = torch.log_softmax(1.6 * torch.log_softmax(cond, -1) - 0.6 * torch.log_softmax(uncond, -1), -1)
    torch.testing.assert_close(torch.log_softmax(out.float(), -1), ref, atol=1e-5, rtol=1e-5)


def test_observe_keeps_sampled_cells_and_noises_observed_ones():
    z_num, z_cat, _ = _state(B=6)
    x_obs = torch.randn(6, 2, dtype=torch.float64)
    x_obs_cat = torch.stack([torch.randint(0, k, (6,)) for k in K], dim=1)
    num_missing = torch.rand(6, 2) < 0.5
    cat_missing = torch.rand(6, 3) < 0.5
    noise, u = torch.randn(6, 2, dtype=torch.float64), torch.rand(6, 3, dtype=torch.float64)
    chance = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    num, cat = diffkern.ops.tabdiff_observe(z_num, z_cat, x_obs, x_obs_cat, num_missing, cat_missing, [0.3, 0.0],
                                            chance, K, seed=0, step=2, noise=noise, uniforms=u)
    torch.testing.assert_close(num, torch.where(num_missing, z_num, x_obs + torch.tensor([0.3, 0.0]) * noise))
    known = torch.where(u < chance, torch.tensor(K).expand(6, -1), x_obs_cat)
    assert torch.equal(cat, torch.where(cat_missing, z_cat, known))


@pytest.mark.parametrize("call,match", [
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1].float(), s[0], s[2], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=0, step=0), "x_cat_hat: expected int64"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0], s[2][:, :-1], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=0, step=0), "logits: expected 12 columns"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0], s[2], [1, 1], [0, 0], K[:2], [0] * 3, [1] * 3,
                                         seed=0, step=0), "num_classes"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0], s[2], [1, 1], [0, 0], K, [0.5] * 3, [0.1] * 3,
                                         seed=0, step=0), "alpha_s"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0] * math.nan, s[2], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=0, step=0), "denoised: non-finite"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1] + 9, s[0], s[2], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=0, step=0), r"x_cat_hat: entry \[0, 0\]"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0], s[2], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=-1, step=0), "seed"),
    (lambda s: diffkern.ops.tabdiff_step(s[0], s[1], s[0], s[2], [1, 1], [0, 0], K, [0] * 3, [1] * 3,
                                         seed=0, step=0, uniforms=torch.ones(6, L, dtype=torch.float64)),
     r"uniforms: every value must lie in \[0, 1\)"),
    (lambda s: diffkern.ops.tabdiff_churn(s[0], s[1], [1, 1], [0.5, 1], [0] * 3, K, seed=0, step=0), "sigma_hat"),
    (lambda s: diffkern.ops.tabdiff_churn(s[0], s[1], [1, 1, 1], [1, 1], [0] * 3, K, seed=0, step=0),
     r"sigma_cur: expected one value per column, shape \[2\]"),
    (lambda s: diffkern.ops.tabdiff_churn(s[0], s[1], [1, 1], [1, 1], [2.0] * 3, K, seed=0, step=0),
     "remask_chance"),
    (lambda s: diffkern.ops.tabdiff_guide(s[0], s[0][:2], 0.5), "uncond: expected shape"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(_state())
