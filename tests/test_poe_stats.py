"""Statistical tests of the PoE samplers: chi-square goodness of fit against exact float64
distributions (scipy.stats), on the reference and every fast backend.

Fixed seeds make every test deterministic (no flakiness); p > 1e-4 with N = 20,000 samples over
V = 6 categories still detects a wrong temperature (e.g. T vs T^2 shifts bins by several
percent -> chi2 in the hundreds) or a missing residual step (position-0 tokens would follow q,
not p).
"""

import math

import pytest
import torch

import diffkern
from diffkern.ops import poe

from conftest import backends_of, need
from poe_helpers import run_on

scipy_stats = pytest.importorskip("scipy.stats")

N = 20_000
V = 6
ALPHA = 1e-4
# triton only on one top_p < 1 case per test: the interpreter takes ~10 s per 20,000-row nucleus call
BACKENDS = backends_of("poe_verify", exclude=("triton",))


def _chi2(samples: torch.Tensor, probs: torch.Tensor, what: str):
    counts = torch.bincount(samples.flatten(), minlength=V).double()
    assert counts.shape[0] == V
    zero = probs <= 0
    assert counts[zero].sum() == 0, f"{what}: a zero-probability token was emitted: {counts.tolist()}"
    if int((~zero).sum()) == 1:
        return                      # a single allowed token: the zero-probability check says it all
    exp = probs[~zero] * counts.sum()
    stat, pval = scipy_stats.chisquare(counts[~zero].numpy(), exp.numpy())
    assert pval > ALPHA, f"{what}: chi2={stat:.1f} p={pval:.2e} counts={counts.tolist()} expected={exp.tolist()}"


def _rows():
    g = torch.Generator().manual_seed(7)
    d = torch.randn(2, V, generator=g, dtype=torch.float64) * 1.5     # W = 2 DLM rows
    a = torch.randn(3, 2, V, generator=g, dtype=torch.float64) * 1.5  # K = 3 particles
    d[:, 0] = -math.inf            # a token the DLM never proposes
    a[:, :, 1] = -math.inf         # a token the AR model forbids
    return d, a


TEMPS = torch.tensor([0.5, 1.0, 2.0])


@pytest.mark.parametrize("backend,top_p", [(b, p) for b in BACKENDS for p in (1.0, 0.8)] +
                         [("triton", 0.8)])
def test_draft_follows_q(backend, top_p):
    need(backend)
    d, _ = _rows()
    dlm = d.float().unsqueeze(0).expand(N, 2, V)                        # stride-0 over B
    tok, log_q = run_on(backend, diffkern.ops.poe_draft, dlm, TEMPS, top_p=top_p, seed=123)
    for k, T in enumerate(TEMPS.tolist()):
        for j in range(2):
            q = poe._proposal(d[j].view(1, V), torch.tensor([T], dtype=torch.float64), top_p)[0]
            _chi2(tok[:, k, j], q, f"draft k={k} j={j} T={T} top_p={top_p}")
            torch.testing.assert_close(log_q[:, k, j], q.log()[tok[:, k, j]].float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,w,top_p", [(b, w, p) for b in BACKENDS
                                             for w, p in [(0.0, 1.0), (0.3, 1.0), (0.3, 0.8), (1.0, 0.8)]] +
                         [("triton", 0.3, 0.8)])
def test_emitted_token_follows_poe_target(backend, w, top_p):
    """The emitted token at position 0 (accepted draft or correction) is distributed as p."""
    need(backend)
    d, a = _rows()
    dlm = d.float().unsqueeze(0).expand(N, 2, V)
    ar = a.float().unsqueeze(0).expand(N, 3, 2, V)
    tok, _ = run_on(backend, diffkern.ops.poe_draft, dlm, TEMPS, top_p=top_p, seed=5)
    res = run_on(backend, diffkern.ops.poe_verify, dlm, ar, tok, TEMPS, weight=w, top_p=top_p, seed=6)
    for k, T in enumerate(TEMPS.tolist()):
        poe_l = poe._weighted(w, d[0]) + poe._weighted(1 - w, a[k, 0])
        p = torch.softmax(poe_l / T, -1)
        _chi2(res.tokens[:, k, 0], p, f"verify k={k} T={T} w={w} top_p={top_p}")
    if w < 1.0 or top_p < 1.0:
        assert bool(res.corrected.any()), "no correction happened: the test would not see the residual"


@pytest.mark.parametrize("backend", BACKENDS)
def test_importance_weights_are_unbiased(backend):
    """W = 1: log_weights = log a(x) - log p(x) with x ~ p, so E[exp(log_weights)] = a(supp p)."""
    need(backend)
    d, a = _rows()
    a = a.clone()
    a[:, :, 1] = 0.0               # the AR target must cover the PoE support for a finite mean
    dlm = d[:1].float().unsqueeze(0).expand(N, 1, V)
    ar = a[:, :1].float().unsqueeze(0).expand(N, 3, 1, V)
    with diffkern.use_backend(backend):
        tok, _ = diffkern.ops.poe_draft(dlm, TEMPS, top_p=0.8, seed=9)
        res = diffkern.ops.poe_verify(dlm, ar, tok, TEMPS, weight=0.3, top_p=0.8, seed=10)
    ratio = res.log_weights.double().exp()
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(N)
    want = []
    for k, T in enumerate(TEMPS.tolist()):
        p = torch.softmax((poe._weighted(0.3, d[0]) + poe._weighted(0.7, a[k, 0])) / T, -1)
        want.append(float(torch.softmax(a[k, 0] / T, -1)[p > 0].sum()))
    want = torch.tensor(want, dtype=torch.float64)
    assert bool(((mean - want).abs() < 5 * se + 1e-3).all()), (mean, want, se)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_is_bitwise_reproducible(backend):
    need(backend)
    d, a = _rows()
    dlm = d.float().unsqueeze(0).expand(64, 2, V)
    ar = a.float().unsqueeze(0).expand(64, 3, 2, V)
    with diffkern.use_backend(backend):
        outs = [diffkern.ops.poe_draft(dlm, TEMPS, top_p=0.8, seed=42, offset=o) for o in (0, 0, 1)]
        vers = [diffkern.ops.poe_verify(dlm, ar, outs[0][0], TEMPS, weight=0.3, seed=42, offset=o)
                for o in (3, 3, 4)]
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        gen = [diffkern.ops.poe_draft(dlm, TEMPS, generator=g)[0] for g in (g1, g2)]
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[2][0])
    for x, y in zip(vers[0], vers[1]):
        assert torch.equal(x, y)
    assert not torch.equal(vers[0].tokens, vers[2].tokens) or not torch.equal(vers[0].num_accepted,
                                                                               vers[2].num_accepted)
    assert torch.equal(gen[0], gen[1])
