"""Triton-specific PoE checks (kernels/poe.py) beyond tests/test_poe_ops.py's backend-vs-reference
matrix: dispatch reasons, parity with top_p < 1, >4 experts, NaN / +inf / empty-row detection,
seeded streams, and the top-p nucleus's edge cases (exact membership from the kernels' own
helpers, and draft + verify end to end). Small shapes: the Triton interpreter is slow."""

import math
import warnings

import pytest
import torch

import diffkern
from diffkern.ops import poe

from conftest import available, on_triton_device
from poe_helpers import make_logits, run_on, safe_draft_uniforms, safe_verify_uniforms

pytestmark = pytest.mark.skipif(not available("triton"), reason="triton backend unavailable")


def test_dispatch_reasons():
    """top_p < 1 is no reason to refuse any more; float64 still is."""
    d, a, temps = make_logits(torch.float32, 2, 2, 2, 7, seed=0)
    T, u = temps.expand(2, 2), torch.rand(2, 2, 3, dtype=torch.float64)
    tok = torch.zeros(2, 2, 2, dtype=torch.int64)
    d, a, T, u, tok, lw = on_triton_device((d, a, T, u, tok, torch.zeros(2, 2)))   # where triton runs
    assert poe._draft_op.reasons("triton", d, T, 0.9, u[..., :2], False) == []
    assert poe._verify_op.reasons("triton", d.unsqueeze(1).expand(2, 2, 2, 7), a, tok, T, lw,
                                  0.3, 0.9, 0.0, u, False, False) == []
    with pytest.raises(RuntimeError, match="dtype torch.float64 is not supported"):
        run_on("triton", diffkern.ops.product_of_experts, [d.double(), d.double()], [0.5, 0.5])


@pytest.mark.parametrize("V", [7, 300])
def test_parity_verify_with_top_p_matches_reference(V):
    """parity=True verifies against the untruncated softmax, so triton runs it for any top_p."""
    B, K, W = 2, 3, 3
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=V)
    tok, _ = run_on("reference", diffkern.ops.poe_draft, d, temps, top_p=0.8,
                  uniforms=safe_draft_uniforms(d, temps, 0.8))
    uv = safe_verify_uniforms(d, a, tok, temps, 0.4, 0.8, parity=True)
    kw = dict(weight=0.4, top_p=0.8, uniforms=uv, parity=True)
    ref = run_on("reference", diffkern.ops.poe_verify, d, a, tok, temps, **kw)
    out = run_on("triton", diffkern.ops.poe_verify, d, a, tok, temps, **kw)
    assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.num_accepted, ref.num_accepted)
    torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)


def test_many_experts_and_zero_weights():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 2, 37, generator=g) for _ in range(6)]
    xs[2][..., 5] = -math.inf          # weight 0 expert: no say
    xs[4][..., 7] = -math.inf          # weight != 0: masks token 7
    ws = [0.7, -0.2, 0.0, 0.3, 0.4, -0.1]
    ref = run_on("reference", diffkern.ops.product_of_experts, xs, ws, temperature=1.3)
    out = run_on("triton", diffkern.ops.product_of_experts, xs, ws, temperature=1.3)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    assert bool(torch.isinf(out[..., 7]).all()) and bool(torch.isfinite(out[..., 5]).all())
    # a non-contiguous expert (V not unit stride) and a 1-D input
    t = torch.randn(37, 4, generator=g).t()
    out = run_on("triton", diffkern.ops.product_of_experts, [t, t.contiguous()], [0.5, 0.5])
    torch.testing.assert_close(out, torch.log_softmax(t, -1), atol=2e-5, rtol=1e-5)
    v = torch.randn(11, generator=g)
    torch.testing.assert_close(run_on("triton", diffkern.ops.product_of_experts, [v], [2.0]),
                               torch.log_softmax(2 * v, -1), atol=2e-5, rtol=1e-5)


def test_bad_logits_are_detected_in_the_pass():
    B, K, W, V = 2, 2, 2, 7
    d, a, temps = make_logits(torch.float32, B, K, W, V, seed=2, mask=False)
    tok = torch.zeros(B, K, W, dtype=torch.int64)
    nan_d = d.clone()
    nan_d[1, 1, 3] = math.nan
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        run_on("triton", diffkern.ops.poe_draft, nan_d, temps, seed=0)
    with pytest.raises(ValueError, match="dlm_logits: contains NaN"):
        run_on("triton", diffkern.ops.poe_verify, nan_d, a, tok, temps, weight=0.3, seed=0)
    inf_a = a.clone()
    inf_a[0, 1, 0, 2] = math.inf
    with pytest.raises(ValueError, match=r"ar_logits: contains \+inf"):
        run_on("triton", diffkern.ops.poe_verify, d, inf_a, tok, temps, weight=0.3, seed=0)
    empty = d.clone()
    empty[0, 1] = -math.inf
    with pytest.raises(ValueError, match="every row needs at least one finite logit"):
        run_on("triton", diffkern.ops.poe_draft, empty, temps, seed=0)
    disjoint_d, disjoint_a = d.clone(), a.clone()
    disjoint_d[0, 0, :4] = -math.inf
    disjoint_a[0, :, 0, 4:] = -math.inf
    with pytest.raises(ValueError, match="PoE logits"):
        run_on("triton", diffkern.ops.poe_verify, disjoint_d, disjoint_a, tok + 5, temps, weight=0.3, seed=0)
    # allow_nan: NaN is a masked token, same result as the reference
    ref = run_on("reference", diffkern.ops.poe_draft, nan_d, temps, seed=4, allow_nan=True)
    out = run_on("triton", diffkern.ops.poe_draft, nan_d, temps, seed=4, allow_nan=True)
    assert torch.equal(out[0], ref[0]) and not bool((out[0][1, :, 1] == 3).any())


def test_seeded_verify_agrees_with_reference():
    d, a, temps = make_logits(torch.float32, 2, 4, 3, 7, seed=5)
    tok, _ = run_on("reference", diffkern.ops.poe_draft, d, temps, seed=1)
    for parity in (False, True):
        ref = run_on("reference", diffkern.ops.poe_verify, d, a, tok, temps, weight=0.5, seed=9, offset=3,
                   parity=parity)
        out = run_on("triton", diffkern.ops.poe_verify, d, a, tok, temps, weight=0.5, seed=9, offset=3,
                   parity=parity)
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.corrected, ref.corrected)
        torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Top-p nucleus edge cases (kernels/poe.py's radix select) against the reference
# ---------------------------------------------------------------------------------------------

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from diffkern.kernels import poe as kpoe  # noqa: E402


@triton.jit
def _nucleus_mask_kernel(x_ptr, t_ptr, out_ptr, R, V, top_p: tl.float64,
                         BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    """The kernels' nucleus membership of rows [R, V] (V <= BLOCK_V), select tiles of BLOCK_S."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    row_ptr = x_ptr + rows.to(tl.int64) * V
    inv_t = 1.0 / tl.load(t_ptr + rows, mask=rmask, other=1.0)
    cols = tl.arange(0, BLOCK_V)
    x, m2 = kpoe._load_row_block(row_ptr, cols, rmask, V)
    m = tl.max(x, axis=1)
    live = m > float("-inf")
    m = tl.where(live, m, 0.0)
    tkey, cut, _ = kpoe._nucleus(row_ptr, live, V, m, inv_t, top_p, BLOCK_R, BLOCK_S)
    keep = kpoe._in_nucleus(x, cols[None, :], tkey[:, None], cut[:, None]) & m2
    tl.store(out_ptr + rows[:, None] * V + cols[None, :], keep.to(tl.int8), mask=m2)


def _nucleus_rows(V=300):
    """Rows [R, V] with the nucleus edge cases, and their temperatures."""
    g = torch.Generator().manual_seed(11)
    rows = [torch.randn(V, generator=g) * s for s in (0.5, 3.0, 10.0)]
    rows.append(torch.randint(0, 4, (V,), generator=g).float())       # massive ties at every level
    zeros = torch.zeros(V)
    zeros[::3] = -0.0                                                 # -0.0 and +0.0 tie
    zeros[::7] = 1.0
    rows.append(zeros)
    masked = torch.randn(V, generator=g)
    masked[torch.rand(V, generator=g) < 0.7] = -math.inf
    rows.append(masked)
    single = torch.full((V,), -math.inf)
    single[V // 2] = 0.3                                              # one finite token
    rows.append(single)
    tail = torch.randn(V, generator=g)
    tail[-50:] = -40.0                                                # mass ~1e-17: out of any nucleus < 1
    rows.append(tail)
    tied_max = torch.randn(V, generator=g)
    tied_max[[5, 17, 250]] = 6.0                                      # the max three times: id 5 first
    rows.append(tied_max)
    x = torch.stack(rows)
    temps = torch.tensor([0.5, 1.0, 2.0])[torch.arange(len(rows)) % 3]
    return x, temps


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("top_p", [1e-9, 0.3, 0.9, 0.999, 1 - 1e-9])
def test_nucleus_membership_matches_reference(dtype, top_p):
    """The exact set (ties at the threshold, -inf, tiny and almost-1 top_p), with select tiles
    (BLOCK_S = 64 < V) so the ties and the digit histograms span several blocks."""
    x, temps = _nucleus_rows()
    x = x.to(dtype)
    R, V = x.shape
    out = torch.zeros(R, V, dtype=torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        on_device = on_triton_device((x, temps, out))
        _nucleus_mask_kernel[(1,)](*on_device, R, V, top_p, BLOCK_R=16, BLOCK_V=512, BLOCK_S=64)
    out = on_device[2].cpu()
    q = torch.softmax(x.double() / temps.double().unsqueeze(-1), -1)
    want = poe.nucleus_mask(q, top_p)
    for r in range(R):
        assert torch.equal(out[r].bool(), want[r]), (r, out[r].nonzero().flatten(), want[r].nonzero().flatten())
    if top_p == 1e-9:   # the argmax, the lowest id among tied maxima
        assert out.sum(1).eq(1).all() and bool(out[8, 5])


def _draft_and_verify_match(d, a, temps, top_p, w=0.3):
    """triton == reference on draft (tokens, log q) and on the non-parity verify of those drafts,
    with the shared [B, W, V] DLM logits read stride-0 over K."""
    ud = safe_draft_uniforms(d, temps, top_p)
    ref_tok, ref_lq = run_on("reference", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    tok, lq = run_on("triton", diffkern.ops.poe_draft, d, temps, top_p=top_p, uniforms=ud)
    assert torch.equal(tok, ref_tok)
    torch.testing.assert_close(lq, ref_lq, atol=5e-4, rtol=1e-4)
    B, K, W, V = a.shape
    dlm = d.unsqueeze(1).expand(B, K, W, V)
    assert dlm.stride(1) == 0
    kw = dict(weight=w, top_p=top_p, uniforms=safe_verify_uniforms(d, a, ref_tok, temps, w, top_p))
    ref = run_on("reference", diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
    out = run_on("triton", diffkern.ops.poe_verify, dlm, a, ref_tok, temps, **kw)
    assert torch.equal(out.num_accepted, ref.num_accepted) and torch.equal(out.corrected, ref.corrected)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.log_weights, ref.log_weights, atol=5e-4, rtol=1e-4)
    return tok


def _edge_inputs(case, dtype):
    B, K, W, V = 2, 3, 3, 64
    g = torch.Generator().manual_seed(len(case))
    d = torch.randn(B, W, V, generator=g) - 2.0
    a = torch.randn(B, K, W, V, generator=g) * 2.0
    temps = torch.tensor([0.7, 1.0, 1.4])
    top_p = 0.9
    if case == "ties":             # a top token, then six equal logits the threshold cuts through
        d[..., 7] = 2.0
        d[..., [3, 11, 20, 21, 40, 63]] = 1.0
        q = torch.softmax(d[0, 0].double(), -1)
        top_p = float(q[7] + 2.5 * q[3])
    elif case == "one_token":      # the argmax only; tied maxima: the lowest id
        d[..., 30] = d[..., 9] = 4.0
        top_p = 1e-6
    elif case == "masked":
        d[..., ::3] = -math.inf
        d[0, 1, :-2] = -math.inf   # a single allowed token (62)
        a[:, :, :, 1::4] = -math.inf
    elif case == "almost_one":     # tokens of mass ~1e-17 leave the nucleus, all others stay
        d[..., 40:] = -40.0
        top_p = 1.0 - 1e-7
    elif case == "mixed_temps":
        temps = torch.tensor([[0.5, 1.0, 2.0], [1.3, 0.8, 0.6]])
        top_p = 0.8
    return d.to(dtype), a.to(dtype), temps, top_p


@pytest.mark.parametrize("case", ["ties", "one_token", "masked", "almost_one", "mixed_temps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nucleus_edge_cases_match_reference(case, dtype):
    d, a, temps, top_p = _edge_inputs(case, dtype)
    tok = _draft_and_verify_match(d, a, temps, top_p)
    if case == "one_token":
        assert bool((tok == 9).all())


def test_nucleus_ties_across_blocks():
    """V = 5000 > the interpreter's 4096-column tile: the kept ties straddle two blocks."""
    B, K, W, V = 1, 2, 2, 5000
    g = torch.Generator().manual_seed(3)
    d = torch.randn(B, W, V, generator=g) - 3.0
    a = torch.randn(B, K, W, V, generator=g)
    ties = [10, 2000, 4095, 4096, 4500, 4999]
    d[..., ties] = 2.0
    q = torch.softmax(d[0, 0].double(), -1)
    top_p = float(3.5 * q[10])         # the six ties are the top tokens: keep four, up to id 4096
    tok = _draft_and_verify_match(d, a, torch.tensor([1.0, 1.0]), top_p)
    assert set(tok.flatten().tolist()) <= set(ties[:4])
