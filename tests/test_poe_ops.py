"""PoE operator family: every backend against the float64 reference with explicit uniforms,
bad input, opcheck and torch.compile. The explicit uniforms come from tests/poe_helpers.py, which
places them far from every rounding boundary, so tokens must match exactly."""

import math

import pytest
import torch

import diffkern
from diffkern.ops import philox, poe

from conftest import available, backends_of, need
from poe_helpers import interpreter_ok, make_logits, run_on, safe_draft_uniforms, safe_verify_uniforms

BACKENDS = backends_of("poe_verify", reference=False)   # every fast backend (cpu, triton)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


CASES = [(dt, V, W, K, top_p) for dt in DTYPES for V in (7, 4099, 32000) for W, K, top_p in
         [(1, 1, 1.0), (5, 4, 0.9), (1, 4, 0.9), (5, 1, 1.0)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,V,W,K,top_p", CASES)
def test_draft_and_verify_match_reference(backend, dtype, V, W, K, top_p):
    need(backend)
    if not interpreter_ok(backend, V, W, K):
        pytest.skip("shape too large for the Triton interpreter")
    B, w = 2, 0.3
    d, a, temps = make_logits(dtype, B, K, W, V, seed=V + W + K)
    ud = safe_draft_uniforms(d, temps, top_p)
    ref_tok, ref_lq = run_on("reference", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    tok, lq = run_on(backend, diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lq, ref_lq, atol=5e-4, rtol=1e-4)

    for parity in (False, True):
        uv = safe_verify_uniforms(d, a, ref_tok, temps, w, top_p, parity)
        dlm = d.unsqueeze(1).expand(B, K, W, V)       # stride-0 over K: read without a copy
        lw0 = torch.linspace(-1, 1, B * K).view(B, K)
        kw = dict(weight=w, top_p=top_p, uniforms=uv, log_weights=lw0, parity=parity,
                  target_temperature=None if K == 1 else 0.9)
        ref = run_on("reference", diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
        out = run_on(backend, diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
        assert torch.equal(out.num_accepted, ref.num_accepted)
        assert torch.equal(out.corrected, ref.corrected)
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.7, 0.9])
def test_signed_zero_logits_tie_in_the_nucleus(backend, top_p):
    """-0.0 and +0.0 are equal logits: the nucleus keeps the lowest ids among them, whatever the
    sign bit (a bitwise sort key would rank -0.0 below +0.0 and cut the wrong tokens)."""
    need(backend)
    B, K, W, V = 1, 1, 16, 30
    row = torch.zeros(V)
    row[::3] = -0.0
    row[::7] = 1.0
    d = row.expand(B, W, V).contiguous()
    temps = torch.tensor([1.0])
    ud = safe_draft_uniforms(d, temps, top_p)
    ref_tok, _ = run_on("reference", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    tok, _ = run_on(backend, diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    assert torch.equal(tok, ref_tok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_weight_edges_and_rejections(backend):
    """w in {0, 1}, a row rejected at j = 0, and the [B, W, V] dlm form (expanded internally)."""
    need(backend)
    B, K, W, V = 2, 4, 3, 7
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=1)
    for w in (0.0, 1.0):
        tok, _ = run_on("reference", diffkern.ops.poe_draft, d, temps, uniforms=safe_draft_uniforms(d, temps, 1.0))
        uv = safe_verify_uniforms(d, a, tok, temps, w, 1.0)
        ref = run_on("reference", diffkern.ops.poe_verify, d, a, tok, temps, weight=w, uniforms=uv)
        out = run_on(backend, diffkern.ops.poe_verify, d, a, tok, temps, weight=w, uniforms=uv)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.num_accepted, ref.num_accepted)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)
        if w == 1.0:
            assert bool((ref.num_accepted == W).all())   # p == q: everything is accepted


@pytest.mark.parametrize("backend", backends_of("product_of_experts"))
def test_product_of_experts(backend):
    need(backend)
    g = torch.Generator().manual_seed(0)
    for dtype, shape in [(torch.float32, (3, 7)), (torch.bfloat16, (2, 3, 4099)), (torch.float16, (1, 33))]:
        cond, uncond = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
        uncond[..., 0] = -math.inf
        s = 1.5
        out = run_on(backend, diffkern.ops.product_of_experts, [cond, uncond], [1 + s, -s], temperature=0.7)
        mixed = ((1 + s) * cond.double() - s * uncond.double().nan_to_num(neginf=0.0))
        mixed[..., 0] = -math.inf       # masked in an expert with a say: masked in the product
        want = torch.log_softmax(mixed / 0.7, -1).float()
        torch.testing.assert_close(out, want, atol=2e-4, rtol=1e-4)
        stacked = torch.stack([cond, uncond])
        out2 = run_on(backend, diffkern.ops.product_of_experts, stacked, torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(out2, torch.log_softmax(uncond.float(), -1), atol=2e-4, rtol=1e-4)


def test_philox_streams_agree():
    if not available("cpu"):
        pytest.skip("cpu backend unavailable")
    for seed, offset, tag in [(0, 0, 1), (2 ** 62 + 12345, 2 ** 40 + 7, 3)]:
        c = torch.ops.diffkern.philox_uniforms(seed, offset, tag, 5, 9)
        t = poe.philox_uniforms(seed, offset, tag, 5, 9)
        assert torch.equal(c, t)
        assert bool(((t > 0) & (t < 1)).all())
    # Random123 known-answer test of the round function
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(x) for x in philox.philox4x32_10(0, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend", backends_of("poe_draft"))
def test_seeded_calls_agree_across_backends(backend):
    need(backend)
    d, a, temps = make_logits(torch.float32, 2, 4, 3, 7, seed=3)
    ref = run_on("reference", diffkern.ops.poe_draft, d, temps, seed=11, offset=5)
    out = run_on(backend, diffkern.ops.poe_draft, d, temps, seed=11, offset=5)
    assert torch.equal(out[0], ref[0])   # V = 7: bins are wide, rounding cannot flip a token here


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _bad_cases():
    B, K, W, V = 2, 3, 4, 7
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=0, mask=False)
    tok = torch.zeros(B, K, W, dtype=torch.int64)
    nan_d = d.clone()
    nan_d[1, 2, 3] = math.nan
    nan_a = a.clone()
    nan_a[0, 0, 0, 0] = math.nan
    empty = d.clone()
    empty[0, 1] = -math.inf
    verify, draft = diffkern.ops.poe_verify, diffkern.ops.poe_draft
    return {   # name -> (call, exception, message pattern)
        "dlm_shape": (lambda: verify(torch.randn(B, W, V + 1), a, tok, temps, weight=0.3), ValueError,
                      r"dlm_logits: expected \[B=2, W=4, V=7\].*\(2, 4, 8\)"),
        "ar_ndim": (lambda: verify(d, a[0], tok, temps, weight=0.3), ValueError, "ar_logits"),
        "token_range": (lambda: verify(d, a, tok + 7, temps, weight=0.3), ValueError,
                        r"draft_tokens: token ids must lie in \[0, V=7\)"),
        "token_shape": (lambda: verify(d, a, tok[:, :, :2], temps, weight=0.3), ValueError, "draft_tokens: expected"),
        "zero_temperature": (lambda: verify(d, a, tok, torch.tensor([1.0, 0.0, 1.0]), weight=0.3), ValueError,
                             "temperatures: every temperature must be finite and > 0"),
        "negative_temperature": (lambda: draft(d, torch.tensor([-1.0])), ValueError, "temperatures: every temperature"),
        "temperature_count": (lambda: verify(d, a, tok, torch.tensor([1.0, 1.0]), weight=0.3), ValueError,
                              "temperatures: expected K=3"),
        "weight_low": (lambda: verify(d, a, tok, temps, weight=-0.1), ValueError, "weight: expected 0 <= weight <= 1"),
        "weight_high": (lambda: verify(d, a, tok, temps, weight=1.5), ValueError, "weight: expected 0 <= weight <= 1"),
        "top_p_zero": (lambda: draft(d, temps, top_p=0.0), ValueError, "top_p: expected 0 < top_p <= 1"),
        "top_p_high": (lambda: draft(d, temps, top_p=1.01), ValueError, "top_p: expected 0 < top_p <= 1"),
        "top_p_negative": (lambda: draft(d, temps, top_p=-1), ValueError, "top_p: expected 0 < top_p <= 1"),
        "uniforms_shape": (lambda: draft(d, temps, uniforms=torch.rand(B, K, W + 1)), ValueError,
                           "uniforms: expected shape"),
        "uniforms_range": (lambda: draft(d, temps, uniforms=torch.full((B, K, W), 1.0)), ValueError,
                           "uniforms: every value"),
        "nan_draft": (lambda: draft(nan_d, temps, seed=0), ValueError, "dlm_logits: contains NaN"),
        "nan_dlm_verify": (lambda: verify(nan_d, a, tok, temps, weight=0.3, seed=0), ValueError,
                           "dlm_logits: contains NaN"),
        "nan_ar_verify": (lambda: verify(d, nan_a, tok, temps, weight=0.3, seed=0), ValueError,
                          "ar_logits: contains NaN"),
        "empty_row": (lambda: draft(empty, temps, seed=0), ValueError,
                      "dlm_logits: every row needs at least one finite logit"),
        "int_ar_logits": (lambda: verify(d, a.long(), tok, temps, weight=0.3), TypeError,
                          "ar_logits: expected a floating dtype"),
        "seed_and_generator": (lambda: draft(d, temps, seed=1, generator=torch.Generator()), ValueError,
                               "seed/generator"),
        "expert_shapes": (lambda: diffkern.ops.product_of_experts([d, a], [0.5, 0.5]), ValueError,
                          r"logits\[1\]: expected shape"),
    }


_BAD = _bad_cases()


@pytest.mark.parametrize("backend", backends_of("poe_verify"))
@pytest.mark.parametrize("name", list(_BAD))
def test_bad_input(backend, name):
    need(backend)
    call, exc, match = _BAD[name]
    with pytest.raises(exc, match=match):
        run_on(backend, call)


@pytest.mark.parametrize("backend", backends_of("poe_draft"))
def test_allow_nan_treats_nan_as_masked(backend):
    need(backend)
    d, _, temps = make_logits(torch.float32, 2, 3, 4, 7, seed=0, mask=False)
    d[1, 2, 3] = math.nan
    tok_nan, _ = run_on(backend, diffkern.ops.poe_draft, d, temps, seed=0, allow_nan=True)
    assert not bool((tok_nan[1, :, 2] == 3).any())


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", backends_of("poe_verify"))
def test_opcheck(backend):
    need(backend)
    B, K, W, V = 2, 3, 2, 7
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=0)
    T = temps.expand(B, K).contiguous()
    with diffkern.use_backend(backend):
        torch.library.opcheck(torch.ops.diffkern.poe_draft.default, (d, T, 0.9, 3, 0, None, False))
        tok, _ = diffkern.ops.poe_draft(d, T, seed=3)
        torch.library.opcheck(torch.ops.diffkern.poe_verify.default,
                              (d.unsqueeze(1).expand(B, K, W, V), a, tok, T, torch.zeros(B, K), 0.3, 1.0, 0.0,
                               4, 0, None, False, False))
        torch.library.opcheck(torch.ops.diffkern.product_of_experts.default, ([a[0], a[1] * 2], [1.5, -0.5], 0.8))


def test_torch_compile_fullgraph():
    B, K, W, V = 2, 3, 2, 7
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=0)

    def step(d, a, temps):
        tok, log_q = diffkern.ops.poe_draft(d, temps, top_p=0.9, seed=1, offset=2)
        res = diffkern.ops.poe_verify(d, a, tok, temps, weight=0.3, top_p=0.9, seed=1, offset=3)
        lp = diffkern.ops.product_of_experts([d, d], [1.5, -0.5])
        return tok, log_q, res.num_accepted, res.tokens, res.log_weights, lp

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    got, want = compiled(d, a, temps), step(d, a, temps)
    for g_, w_ in zip(got, want):
        assert torch.equal(g_, w_)
