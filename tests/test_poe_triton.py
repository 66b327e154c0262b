"""Triton-specific PoE checks (kernels/poe.py) beyond tests/test_poe_ops.py's backend-vs-reference
matrix: dispatch reasons, parity with top_p < 1, >4 experts, NaN / +inf / empty-row detection,
seeded streams. Small shapes: the Triton interpreter is slow."""

import math
import warnings

import pytest
import torch

import diffkern
from diffkern.ops import poe

from conftest import available
from test_poe_ops import _make, _run, safe_draft_uniforms, safe_verify_uniforms

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton backend unavailable")


def test_dispatch_reasons():
    """top_p < 1 is no reason to refuse any more; float64 still is."""
    d, a, temps = _make(torch.float32, 2, 2, 2, 7, seed=0)
    T, u = temps.expand(2, 2), torch.rand(2, 2, 3, dtype=torch.float64)
    tok = torch.zeros(2, 2, 2, dtype=torch.int64)
    assert poe._draft_op.reasons("triton", d, T, 0.9, u[..., :2], False) == []
    assert poe._verify_op.reasons("triton", d.unsqueeze(1).expand(2, 2, 2, 7), a, tok, T, torch.zeros(2, 2),
                                  0.3, 0.9, 0.0, u, False, False) == []
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
        _run("triton", diffkern.ops.product_of_experts, [d.double(), d.double()], [0.5, 0.5])


@pytest.mark.parametrize("V", [7, 300])
def test_parity_verify_with_top_p_matches_reference(V):
    """parity=True verifies against the untruncated softmax, so triton runs it for any top_p."""
    B, K, W = 2, 3, 3
    d, a, temps = _make(torch.float32, B, K, W, V, seed=V)
    tok, _ = _run("reference", diffkern.ops.poe_draft, d, temps, top_p=0.8,
                  uniforms=safe_draft_uniforms(d, temps, 0.8))
    uv = safe_verify_uniforms(d, a, tok, temps, 0.4, 0.8, parity=True)
    kw = dict(weight=0.4, top_p=0.8, uniforms=uv, parity=True)
    ref = _run("reference", diffkern.ops.poe_verify, d, a, tok, temps, **kw)
    out = _run("triton", diffkern.ops.poe_verify, d, a, tok, temps, **kw)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.num_accepted, ref.num_accepted)
    torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)


def test_many_experts_and_zero_weights():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 2, 37, generator=g) for _ in range(6)]
    xs[2][..., 5] = -math.inf          # weight 0 expert: no say
    xs[4][..., 7] = -math.inf          # weight != 0: masks token 7
    ws = [0.7, -0.2, 0.0, 0.3, 0.4, -0.1]
    ref = _run("reference", diffkern.ops.product_of_experts, xs, ws, temperature=1.3)
    out = _run("triton", diffkern.ops.product_of_experts, xs, ws, temperature=1.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert bool(torch.isinf(out[..., 7]).all()) and bool(torch.isfinite(out[..., 5]).all())
    # a non-contiguous expert (V not unit stride) and a 1-D input
    t = torch.randn(37, 4, generator=g).t()
    out = _run("triton", diffkern.ops.product_of_experts, [t, t.contiguous()], [0.5, 0.5])
    torch.testing.assert_close(out, torch.log_softmax(t, -1), atol=2e-5, rtol=1e-5)
    v = torch.randn(11, generator=g)
    torch.testing.assert_close(_run("triton", diffkern.ops.product_of_experts, [v], [2.0]),
                               torch.log_softmax(2 * v, -1), atol=2e-5, rtol=1e-5)


def test_bad_logits_are_detected_in_the_pass():
    B, K, W, V = 2, 2, 2, 7
    d, a, temps = _make(torch.float32, B, K, W, V, seed=2, mask=False)
    tok = torch.zeros(B, K, W, dtype=torch.int64)
    nan_d = d.clone()
    nan_d[1, 1, 3] = math.nan
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        _run("triton", diffkern.ops.poe_draft, nan_d, temps, seed=0)
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        _run("triton", diffkern.ops.poe_verify, nan_d, a, tok, temps, weight=0.3, seed=0)
    inf_a = a.clone()
    inf_a[0, 1, 0, 2] = math.inf
    with pytest.raises(ValueError, match=r"ar_logits: contains \+inf"):
        _run("triton", diffkern.ops.poe_verify, d, inf_a, tok, temps, weight=0.3, seed=0)
    empty = d.clone()
    empty[0, 1] = -math.inf
    with pytest.raises(ValueError, match="every row needs at least one finite logit"):
        _run("triton", diffkern.ops.poe_draft, empty, temps, seed=0)
    disjoint_d, disjoint_a = d.clone(), a.clone()
    disjoint_d[0, 0, :4] = -math.inf
    disjoint_a[0, :, 0, 4:] = -math.inf
    with pytest.raises(ValueError, match="PoE logits"):
        _run("triton", diffkern.ops.poe_verify, disjoint_d, disjoint_a, tok + 5, temps, weight=0.3, seed=0)
    # allow_nan: NaN is a masked token, same result as the reference
    ref = _run("reference", diffkern.ops.poe_draft, nan_d, temps, seed=4, allow_nan=True)
    out = _run("triton", diffkern.ops.poe_draft, nan_d, temps, seed=4, allow_nan=True)
    assert torch.equal(out[0], ref[0]) and not bool((out[0][1, :, 1] == 3).any())


def test_seeded_verify_agrees_with_reference():
    d, a, temps = _make(torch.float32, 2, 4, 3, 7, seed=5)
    tok, _ = _run("reference", diffkern.ops.poe_draft, d, temps, seed=1)
    for parity in (False, True):
        ref = _run("reference", diffkern.ops.poe_verify, d, a, tok, temps, weight=0.5, seed=9, offset=3,
                   parity=parity)
        out = _run("triton", diffkern.ops.poe_verify, d, a, tok, temps, weight=0.5, seed=9, offset=3,
                   parity=parity)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.corrected, ref.corrected)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)
