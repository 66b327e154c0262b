"""PoE operator family: every backend against the float64 reference with explicit uniforms,
bad input, opcheck and torch.compile.

Explicit-uniform tests are robust *by design*: the reference accumulates in float64, the fast
backends exp in float32 and accumulate CDFs in float64 (another order), so a uniform within
~1e-6 of a CDF boundary or of an acceptance ratio could legitimately flip a token. The helpers
below therefore place every uniform at the *middle* of a bin of width >= 1e-3 of the float64
reference (draft: the midpoint of a token with q >= 1e-3; acceptance: halfway between 0 and the
ratio, or between the ratio and 1; residual: the midpoint of a residual token with mass >= 1e-3).
Margins are then >= 5e-4, three orders above any rounding, and tokens must match exactly.
"""

import itertools
import math
import warnings

import pytest
import torch

import diffkern
from diffkern.ops import philox, poe

from conftest import TRITON_DEVICE, available, triton_call

def _triton_poe_kernels() -> bool:
    try:
        import diffkern.kernels.poe  # noqa: F401
    except ImportError:
        return False
    return True


# The Triton PoE kernels (kernels/poe.py) are not written yet; they join the list when they exist.
BACKENDS = ["cpu"] + (["triton"] if _triton_poe_kernels() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _interp_ok(backend, V, W, K):
    # The Triton interpreter costs ms per program-iteration: keep its share small (its tiles of up
    # to 1024 rows x 4096 columns make every case below a few seconds, V = 32000 top_p < 1 included).
    return backend != "triton" or TRITON_DEVICE == "cuda" or V * W * K <= 32000 * 5 * 4


def _make(dtype, B, K, W, V, seed, mask=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(B, W, V, generator=g) * scale).to(dtype)
    a = (torch.randn(B, K, W, V, generator=g) * scale).to(dtype)
    if mask and V > 3:
        d[0, 0, : V // 3] = -math.inf        # masked vocabulary in the DLM
        a[:, 0, -1, V // 2:] = -math.inf     # ... and in the AR model
    temps = torch.tensor([0.6, 1.0, 1.7, 0.8][:K])
    return d, a, temps


def _rows(d4, a, temps, w, top_p, parity=False):
    """float64 q, p rows [B, K, W, V] exactly as the reference defines them."""
    T = temps.double().view(1, -1, 1) if temps.dim() == 1 else temps.double().unsqueeze(-1)
    q = torch.stack([poe._proposal(d4[:, :, j], T.squeeze(-1).expand(d4.shape[0], -1), 1.0 if parity else top_p)
                     for j in range(d4.shape[2])], dim=2)
    poe_l = poe._weighted(w, d4.double()) + poe._weighted(1 - w, a.double())
    p = torch.softmax(poe_l / T.unsqueeze(-1), dim=-1)
    return q, p


def _mid_uniform(weights, g, min_mass=1e-3):
    """A uniform in the middle of a randomly chosen bin of mass >= min_mass (normalised)."""
    w = weights / weights.sum()
    ok = w >= min(min_mass, float(w.max()))
    cand = ok.nonzero().flatten()
    x = int(cand[torch.randint(len(cand), (1,), generator=g)])
    cdf = torch.cumsum(w, 0)
    return float(cdf[x] - w[x] / 2), x


def safe_draft_uniforms(d, temps, top_p, seed=0):
    B, W, V = d.shape
    K = temps.shape[-1]
    g = torch.Generator().manual_seed(seed)
    T = temps.expand(B, K)
    u = torch.empty(B, K, W, dtype=torch.float64)
    for j in range(W):
        q = poe._proposal(d[:, j].double().unsqueeze(1).expand(B, K, V), T.double(), top_p)
        for b, k in itertools.product(range(B), range(K)):
            u[b, k, j], _ = _mid_uniform(q[b, k], g)
    return u


def safe_verify_uniforms(d, a, drafts, temps, w, top_p, parity=False, seed=0):
    B, K, W, V = a.shape
    d4 = d.unsqueeze(1).expand(B, K, W, V)
    q, p = _rows(d4, a, temps, w, top_p, parity)
    g = torch.Generator().manual_seed(seed)
    u = torch.empty(B, K, W + 1, dtype=torch.float64)
    for b, k in itertools.product(range(B), range(K)):
        rejected_at = None
        for j in range(W):
            x = int(drafts[b, k, j])
            qx, px = float(q[b, k, j, x]), float(p[b, k, j, x])
            ratio = px / qx if qx > 0 else 0.0
            resid = (p[b, k, j] - q[b, k, j]).clamp_min(0)
            can_reject = qx > 0 and ratio < 0.999 and float(resid.sum()) > 1e-3
            if can_reject and (ratio < 1e-3 or bool(torch.rand(1, generator=g) < 0.4)):
                u[b, k, j] = ratio + (1 - ratio) / 2
                if rejected_at is None:
                    rejected_at = j
            else:
                assert qx > 0 and ratio > 1e-3, "test drafts must be drawn from q with margin"
                u[b, k, j] = min(ratio, 1.0) / 2
        if rejected_at is None:
            u[b, k, W] = 0.5
        else:
            resid = (p[b, k, rejected_at] - q[b, k, rejected_at]).clamp_min(0)
            u[b, k, W], _ = _mid_uniform(resid, g)
    return u


def _run(backend, fn, *args, **kwargs):
    with diffkern.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # numpy noise of the Triton interpreter
        if backend == "triton":                            # CUDA tensors unless interpreted (conftest)
            return triton_call(fn, *args, **kwargs)
        return fn(*args, **kwargs)


def _need(backend):
    if not available(backend):
        pytest.skip(f"{backend} backend unavailable: {diffkern.backends()[backend].reason}")


CASES = [(dt, V, W, K, top_p) for dt in DTYPES for V in (7, 4099, 32000) for W, K, top_p in
         [(1, 1, 1.0), (5, 4, 0.9), (1, 4, 0.9), (5, 1, 1.0)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,V,W,K,top_p", CASES)
def test_draft_and_verify_match_reference(backend, dtype, V, W, K, top_p):
    _need(backend)
    if not _interp_ok(backend, V, W, K):
        pytest.skip("shape too large for the Triton interpreter")
    B, w = 2, 0.3
    d, a, temps = _make(dtype, B, K, W, V, seed=V + W + K)
    ud = safe_draft_uniforms(d, temps, top_p)
    ref_tok, ref_lq = _run("reference", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    tok, lq = _run(backend, diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lq, ref_lq, atol=5e-4, rtol=1e-4)

    for parity in (False, True):
        uv = safe_verify_uniforms(d, a, ref_tok, temps, w, top_p, parity)
        dlm = d.unsqueeze(1).expand(B, K, W, V)       # stride-0 over K: read without a copy
        lw0 = torch.linspace(-1, 1, B * K).view(B, K)
        kw = dict(weight=w, top_p=top_p, uniforms=uv, log_weights=lw0, parity=parity,
                  target_temperature=None if K == 1 else 0.9)
        ref = _run("reference", diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
        out = _run(backend, diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
        assert torch.equal(out.num_accepted, ref.num_accepted)
        assert torch.equal(out.corrected, ref.corrected)
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.7, 0.9])
def test_signed_zero_logits_tie_in_the_nucleus(backend, top_p):
    """-0.0 and +0.0 are equal logits: the nucleus keeps the lowest ids among them, whatever the
    sign bit (a bitwise sort key would rank -0.0 below +0.0 and cut the wrong tokens)."""
    _need(backend)
    B, K, W, V = 1, 1, 16, 30
    row = torch.zeros(V)
    row[::3] = -0.0
    row[::7] = 1.0
    d = row.expand(B, W, V).contiguous()
    temps = torch.tensor([1.0])
    ud = safe_draft_uniforms(d, temps, top_p)
    ref_tok, _ = _run("reference", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    tok, _ = _run(backend, diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    assert torch.equal(tok, ref_tok)


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_weight_edges_and_rejections(backend):
    """w in {0, 1}, a row rejected at j = 0, and the [B, W, V] dlm form (expanded internally)."""
    _need(backend)
    B, K, W, V = 2, 4, 3, 7
    d, a, temps = _make(torch.float32, B, K, W, V, seed=1)
    for w in (0.0, 1.0):
        tok, _ = _run("reference", diffkern.ops.poe_draft, d, temps, uniforms=safe_draft_uniforms(d, temps, 1.0))
        uv = safe_verify_uniforms(d, a, tok, temps, w, 1.0)
        ref = _run("reference", diffkern.ops.poe_verify, d, a, tok, temps, weight=w, uniforms=uv)
        out = _run(backend, diffkern.ops.poe_verify, d, a, tok, temps, weight=w, uniforms=uv)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.num_accepted, ref.num_accepted)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)
        if w == 1.0:
            assert bool((ref.num_accepted == W).all())   # p == q: everything is accepted


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_product_of_experts(backend):
    _need(backend)
    g = torch.Generator().manual_seed(0)
    for dtype, shape in [(torch.float32, (3, 7)), (torch.bfloat16, (2, 3, 4099)), (torch.float16, (1, 33))]:
        cond, uncond = (torch.randn(*shape, generator=g).to(dtype) for _ in range(2))
        uncond[..., 0] = -math.inf
        s = 1.5
        out = _run(backend, diffkern.ops.product_of_experts, [cond, uncond], [1 + s, -s], temperature=0.7)
        mixed = ((1 + s) * cond.double() - s * uncond.double().nan_to_num(neginf=0.0))
        mixed[..., 0] = -math.inf       # masked in an expert with a say: masked in the product
        want = torch.log_softmax(mixed / 0.7, -1).float()
        torch.testing.assert_close(out, want, atol=2e-4, rtol=1e-4)
        stacked = torch.stack([cond, uncond])
        out2 = _run(backend, diffkern.ops.product_of_experts, stacked, torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(out2, torch.log_softmax(uncond.float(), -1), atol=2e-4, rtol=1e-4)


def test_philox_streams_agree():
    if not available("cpu"):
        pytest.skip("cpu backend unavailable")
    for seed, offset, tag in [(0, 0, 1), (2 ** 62 + 12345, 2 ** 40 + 7, 3)]:
        c = torch.ops.diffkern.poe_philox_uniforms(seed, offset, tag, 5, 9)
        t = poe.philox_uniforms(seed, offset, tag, 5, 9)
        assert torch.equal(c, t)
        assert bool(((t > 0) & (t < 1)).all())
    # Random123 known-answer test of the round function
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(x) for x in philox.philox4x32_10(0, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_seeded_calls_agree_across_backends(backend):
    _need(backend)
    d, a, temps = _make(torch.float32, 2, 4, 3, 7, seed=3)
    ref = _run("reference", diffkern.ops.poe_draft, d, temps, seed=11, offset=5)
    out = _run(backend, diffkern.ops.poe_draft, d, temps, seed=11, offset=5)
    assert torch.equal(out[0], ref[0])   # V = 7: bins are wide, rounding cannot flip a token here


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_bad_input(backend):
    _need(backend)
    B, K, W, V = 2, 3, 4, 7
    d, a, temps = _make(torch.float32, B, K, W, V, seed=0, mask=False)
    tok = torch.zeros(B, K, W, dtype=torch.int64)
    verify = lambda *args, **kw: _run(backend, diffkern.ops.poe_verify, *args, **kw)  # noqa: E731
    draft = lambda *args, **kw: _run(backend, diffkern.ops.poe_draft, *args, **kw)    # noqa: E731
    with pytest.raises(ValueError, match=r"dlm_logits: expected \[B=2, W=4, V=7\].*\(2, 4, 8\)"):
        verify(torch.randn(B, W, V + 1), a, tok, temps, weight=0.3)
    with pytest.raises(ValueError, match="ar_logits"):
        verify(d, a[0], tok, temps, weight=0.3)
    with pytest.raises(ValueError, match=r"draft_tokens: token ids must lie in \[0, V=7\)"):
        verify(d, a, tok + 7, temps, weight=0.3)
    with pytest.raises(ValueError, match="draft_tokens: expected"):
        verify(d, a, tok[:, :, :2], temps, weight=0.3)
    with pytest.raises(ValueError, match="temperatures: every temperature must be finite and > 0"):
        verify(d, a, tok, torch.tensor([1.0, 0.0, 1.0]), weight=0.3)
    with pytest.raises(ValueError, match="temperatures: every temperature"):
        draft(d, torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="temperatures: expected K=3"):
        verify(d, a, tok, torch.tensor([1.0, 1.0]), weight=0.3)
    for w in (-0.1, 1.5):
        with pytest.raises(ValueError, match="weight: expected 0 <= weight <= 1"):
            verify(d, a, tok, temps, weight=w)
    for p in (0.0, 1.01, -1):
        with pytest.raises(ValueError, match="top_p: expected 0 < top_p <= 1"):
            draft(d, temps, top_p=p)
    with pytest.raises(ValueError, match="uniforms: expected shape"):
        draft(d, temps, uniforms=torch.rand(B, K, W + 1))
    with pytest.raises(ValueError, match="uniforms: every value"):
        draft(d, temps, uniforms=torch.full((B, K, W), 1.0))
    nan_d = d.clone()
    nan_d[1, 2, 3] = math.nan
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        draft(nan_d, temps, seed=0)
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        verify(nan_d, a, tok, temps, weight=0.3, seed=0)
    nan_a = a.clone()
    nan_a[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="ar_logits: contains NaN"):
        verify(d, nan_a, tok, temps, weight=0.3, seed=0)
    # opt in: NaN is a masked token
    tok_nan, _ = draft(nan_d, temps, seed=0, allow_nan=True)
    assert not bool((tok_nan[1, :, 2] == 3).any())
    empty = d.clone()
    empty[0, 1] = -math.inf
    with pytest.raises(ValueError, match="dlm_logits: every row needs at least one finite logit"):
        draft(empty, temps, seed=0)
    with pytest.raises(TypeError, match="ar_logits: expected a floating dtype"):
        verify(d, a.long(), tok, temps, weight=0.3)
    with pytest.raises(ValueError, match="seed/generator"):
        draft(d, temps, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"logits\[1\]: expected shape"):
        diffkern.ops.product_of_experts([d, a], [0.5, 0.5])


# ---------------------------------------------------------------------------------------------
# torch.library.opcheck and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_opcheck(backend):
    _need(backend)
    B, K, W, V = 2, 3, 2, 7
    d, a, temps = _make(torch.float32, B, K, W, V, seed=0)
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
    d, a, temps = _make(torch.float32, B, K, W, V, seed=0)

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
