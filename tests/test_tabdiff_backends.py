"""The fast backends of the tabdiff_* family (cpu: csrc/cpu/tabdiff.cpp; triton: kernels/tabdiff.py)
against the float64 reference (pyglue/ops/tabdiff.py, the spec).

* With explicit noise/uniforms every backend returns the reference's values: categories exactly,
  numbers to float tolerance (both compute in float64 in the same order; the reference rounds
  to the state's dtype at the end, as do the kernels).
* Without them the kernels draw the same Philox stream themselves (only for the cells that use
  it): uniforms are bit-identical, so categories are equal; normals agree to the last bits of
  the libm in use.
* The fused draw follows the exact unmask distribution and the re-mask rate (chi-square /
  binomial), bad values raise the reference's errors, and no allocation grows with the number of
  random numbers a step uses.
"""

import math

import pytest
import torch

import diffkern
from diffkern.ops import tabdiff as td

from conftest import backends_of, need
from poe_helpers import run_on

scipy_stats = pytest.importorskip("scipy.stats")

FAST = backends_of("tabdiff_step", reference=False)
ADULT_K = [9, 16, 7, 15, 6, 5, 2, 42, 2]      # Adult's categorical columns (L = 113)


def _problem(B, n=3, K=(3, 1, 5), masked=0.6, dtype=torch.float32, logit_dtype=torch.float32, seed=0):
    """A random sampler state and network output, with the per-step tables of a mid-run step."""
    g = torch.Generator().manual_seed(seed)
    K = list(K)
    m, L = len(K), sum(K) + len(K)
    x_num = (torch.randn(B, n, generator=g, dtype=torch.float64) * 3).to(dtype)
    x_cat = torch.stack([torch.randint(0, k, (B,), generator=g) for k in K], 1) if m else torch.zeros(B, 0).long()
    x_cat = torch.where(torch.rand(B, m, generator=g) < masked, torch.tensor(K, dtype=torch.int64), x_cat)
    logits = (torch.randn(B, L, generator=g, dtype=torch.float64) * 3).to(logit_dtype)
    denoised = torch.randn(B, n, generator=g, dtype=torch.float64).to(dtype)
    sigma = torch.rand(n, generator=g, dtype=torch.float64) * 2 + 0.2
    alpha_t = torch.rand(m, generator=g, dtype=torch.float64) * 0.5
    return dict(x_num=x_num, x_cat=x_cat, logits=logits, denoised=denoised, K=K, sigma=sigma,
                sigma_hat=sigma * 1.02, sigma_next=sigma * 0.7, remask=torch.full((m,), 0.3, dtype=torch.float64),
                alpha_t=alpha_t, alpha_s=alpha_t + 0.4)


def _all_ops(backend, p, seed=7, step=3, row_start=0, explicit=None):
    """churn -> step -> heun -> observe on one backend; ``explicit``: dict of noise/uniform grids."""
    e = explicit or {}
    o = diffkern.ops
    x_hat, c_hat = run_on(backend, o.tabdiff_churn, p["x_num"], p["x_cat"], p["sigma"], p["sigma_hat"], p["remask"],
                          p["K"], seed=seed, step=step, row_start=row_start, noise=e.get("churn_noise"),
                          uniforms=e.get("remask"))
    x_next, c_next, d = run_on(backend, o.tabdiff_step, x_hat, c_hat, p["denoised"], p["logits"], p["sigma_hat"],
                               p["sigma_next"], p["K"], p["alpha_t"], p["alpha_s"], seed=seed, step=step,
                               row_start=row_start, uniforms=e.get("unmask"))
    heun = run_on(backend, o.tabdiff_heun, x_hat, x_next, p["denoised"] * 0.5, d, p["sigma_hat"], p["sigma_next"])
    g = torch.Generator().manual_seed(step)
    num_missing = torch.rand(p["x_num"].shape, generator=g) < 0.5
    cat_missing = torch.rand(p["x_cat"].shape, generator=g) < 0.5
    observed = run_on(backend, o.tabdiff_observe, heun, c_next, p["x_num"], p["x_cat"].clamp(max=0), num_missing,
                      cat_missing, p["sigma_next"], p["remask"], p["K"], seed=seed, step=step, row_start=row_start,
                      noise=e.get("obs_noise"), uniforms=e.get("obs_uniforms"))
    return dict(x_hat=x_hat, c_hat=c_hat, x_next=x_next, c_next=c_next, d=d, heun=heun, obs_num=observed[0],
                obs_cat=observed[1])


def _explicit(p, seed=1):
    g = torch.Generator().manual_seed(seed)
    (B, n), m, L = p["x_num"].shape, len(p["K"]), sum(p["K"]) + len(p["K"])
    return dict(churn_noise=torch.randn(B, n, generator=g, dtype=torch.float64),
                remask=torch.rand(B, m, generator=g, dtype=torch.float64),
                unmask=torch.rand(B, L, generator=g, dtype=torch.float64),
                obs_noise=torch.randn(B, n, generator=g, dtype=torch.float64),
                obs_uniforms=torch.rand(B, m, generator=g, dtype=torch.float64))


def _assert_same(out, ref, dtype, normal_tol=0.0):
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=1e-12 + normal_tol, rtol=1e-12)
    for name, r in ref.items():
        if r.dtype == torch.int64:
            assert torch.equal(out[name], r), name
        else:
            assert out[name].dtype == r.dtype, name
            torch.testing.assert_close(out[name], r, **tol, msg=lambda s, name=name: f"{name}: {s}")


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,logit_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                               (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("shape", [dict(B=7), dict(B=300, n=6, K=ADULT_K), dict(B=5, n=0), dict(B=5, K=())])
def test_explicit_random_numbers_give_the_reference_values(backend, dtype, logit_dtype, shape):
    need(backend)
    p = _problem(**shape, dtype=dtype, logit_dtype=logit_dtype)
    e = _explicit(p)
    _assert_same(_all_ops(backend, p, explicit=e), _all_ops("reference", p, explicit=e), dtype)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_in_kernel_stream_is_the_reference_stream(backend, dtype):
    """Seeded calls: the kernels draw Philox themselves, only for the cells that use it."""
    need(backend)
    p = _problem(B=257, n=6, K=ADULT_K, dtype=dtype)
    for seed, step, row_start in [(7, 3, 0), (2 ** 64 - 5, 49, 10_000), (0, 2 ** 40, 3)]:
        _assert_same(_all_ops(backend, p, seed, step, row_start), _all_ops("reference", p, seed, step, row_start),
                     dtype, normal_tol=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_rows_split_anywhere_give_the_same_table(backend):
    """A row's random numbers depend on its global index only: any split concatenates exactly."""
    need(backend)
    p = _problem(B=100, n=6, K=ADULT_K, dtype=torch.float64)
    whole = _all_ops(backend, p, row_start=500)
    parts = []
    for s in (slice(0, 1), slice(1, 37), slice(37, 100)):
        q = {k: (v[s] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in p.items()}
        parts.append(_all_ops(backend, q, row_start=500 + s.start))
    for name in ("x_hat", "c_hat", "x_next", "c_next", "heun"):
        assert torch.equal(torch.cat([part[name] for part in parts]), whole[name]), name


@pytest.mark.parametrize("backend", FAST)
def test_strided_inputs(backend):
    """Row-strided views (a slice of a wider buffer) and a transposed state are read correctly."""
    need(backend)
    p = _problem(B=40, n=4, K=ADULT_K, dtype=torch.float32)
    e = _explicit(p)
    wide = dict(p)
    wide["logits"] = torch.cat([p["logits"], torch.zeros(40, 5)], 1)[:, :p["logits"].shape[1]]
    wide["x_num"] = p["x_num"].t().contiguous().t()                     # column-major
    wide["denoised"] = torch.cat([torch.zeros(40, 2), p["denoised"]], 1)[:, 2:]
    _assert_same(_all_ops(backend, wide, explicit=e), _all_ops("reference", p, explicit=e), torch.float32)


@pytest.mark.skipif("triton" not in FAST, reason="no triton backend registered")
def test_triton_gpu_tiles(monkeypatch):
    """The Triton kernels at their GPU tiles (512 cells: several row blocks, numerical columns in
    chunks of 64, a 128-slot race tile of 4 rows): under the interpreter the tests above run big
    tiles (one row block, one column chunk), so this one runs the GPU's tiling on CPU tensors."""
    need("triton")
    from diffkern.kernels import tabdiff as kernels
    monkeypatch.setattr(kernels, "_interpreted", lambda t: False)
    p = _problem(B=13, n=70, K=(100, 1, 9), masked=0.5)
    e = _explicit(p)
    _assert_same(_all_ops("triton", p, explicit=e), _all_ops("reference", p, explicit=e), torch.float32)
    key = (2 ** 64 - 5, 49, 10_000)
    _assert_same(_all_ops("triton", p, *key), _all_ops("reference", p, *key), torch.float32, normal_tol=1e-12)


@pytest.mark.parametrize("backend", FAST)
def test_fused_unmask_draw_follows_the_exact_distribution(backend):
    """Every row masked in a 6-class column: P(c) = p_c (a_s - a_t) / (1 - a_t), P(MASK) = (1 - a_s) / (1 - a_t).
    A sampler that left the MASK logit in the softmax fails the same test."""
    need(backend)
    B, k = 30_000, 6
    logits = torch.tensor([[1.0, -0.5, 0.3, 2.0, -3.0, 0.0, 6.0]]).expand(B, -1).contiguous()
    x_cat = torch.full((B, 1), k)
    at, as_ = torch.tensor([0.15], dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64)
    z = torch.zeros(B, 0)
    _, drawn, _ = run_on(backend, diffkern.ops.tabdiff_step, z, x_cat, z, logits, [], [], [k], at, as_,
                         seed=123, step=17, row_start=9)
    p = torch.softmax(logits[0, :k].double(), 0)
    expect = torch.cat([p * (as_ - at), 1 - as_]) / (1 - at)
    counts = torch.bincount(drawn[:, 0], minlength=k + 1).double()
    assert scipy_stats.chisquare(counts.numpy(), (expect * B).numpy())[1] > 1e-4, (counts / B, expect)
    wrong = torch.softmax(logits[0].double(), 0) * (as_ - at)
    wrong = torch.cat([wrong[:k], 1 - as_ + wrong[k:]])
    assert scipy_stats.chisquare(counts.numpy(), (wrong / wrong.sum() * B).numpy())[1] < 1e-6


@pytest.mark.parametrize("backend", FAST)
def test_remask_rate(backend):
    """Churn re-masks each decoded cell with probability remask_chance (two-sided binomial test);
    MASK cells stay MASK."""
    need(backend)
    B, chance = 40_000, [0.0, 0.05, 0.5]
    x_cat = torch.stack([torch.zeros(B).long(), torch.ones(B).long(), torch.full((B,), 2)], 1)
    x_cat[::10, 2] = 3                                                   # already masked
    z = torch.zeros(B, 0)
    _, out = run_on(backend, diffkern.ops.tabdiff_churn, z, x_cat, [], [], chance, [3, 3, 3], seed=5, step=2)
    assert not bool((out[:, 0] == 3).any())
    assert bool((out[::10, 2] == 3).all())
    for j, c in ((1, 0.05), (2, 0.5)):
        decoded = x_cat[:, j] != 3
        hits = int((out[decoded, j] == 3).sum())
        assert scipy_stats.binomtest(hits, int(decoded.sum()), c).pvalue > 1e-4, (j, hits)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("poison,match", [
    ("denoised_nan", r"denoised: non-finite value nan at \[3, 1\] \(the network's output at step 3\)"),
    ("masked_logit_nan", "logits: NaN or \\+inf in column 1's logits in the network's output at step 3"),
    ("masked_all_neg_inf", "every class logit of column 1 is -inf for a masked row at step 3"),
    ("bad_category", r"x_cat_hat: entry \[2, 0\] = 9 is outside \[0, 3\]"),
])
def test_bad_values_raise_the_reference_error(backend, poison, match):
    need(backend)
    p = _problem(B=8, K=(3, 2, 5), masked=0.0)
    x_cat, logits, denoised = p["x_cat"].clone(), p["logits"].clone(), p["denoised"].clone()
    x_cat[4, 1] = 2                                                        # row 4, column 1 masked
    if poison == "denoised_nan":
        denoised[3, 1] = math.nan
    elif poison == "masked_logit_nan":
        logits[4, 5] = math.nan
    elif poison == "masked_all_neg_inf":
        logits[4, 4:6] = -math.inf
    else:
        x_cat[2, 0] = 9
    args = (p["x_num"], x_cat, denoised, logits, p["sigma_hat"], p["sigma_next"], p["K"], p["alpha_t"], p["alpha_s"])
    for b in ("reference", backend):
        with pytest.raises(ValueError, match=match):
            run_on(b, diffkern.ops.tabdiff_step, *args, seed=0, step=3)


@pytest.mark.parametrize("backend", FAST)
def test_unused_bad_logits_are_not_errors(backend):
    """NaN logits of decoded cells are never read (as in the reference): no error, values copied."""
    need(backend)
    p = _problem(B=6, masked=0.0)
    logits = p["logits"].clone()
    logits[:, :4] = math.nan                                               # column 0 decoded in every row
    args = (p["x_num"], p["x_cat"], p["denoised"], logits, p["sigma_hat"], p["sigma_next"], p["K"], p["alpha_t"],
            p["alpha_s"])
    out = run_on(backend, diffkern.ops.tabdiff_step, *args, seed=0, step=3)
    assert torch.equal(out[1], p["x_cat"])


def test_cpu_backend_explains_dtypes_it_cannot_take():
    need("cpu")
    p = _problem(B=4, dtype=torch.float16)
    with diffkern.use_backend("cpu"), pytest.raises(diffkern.BackendError, match="x_num"):
        diffkern.ops.tabdiff_churn(p["x_num"], p["x_cat"], p["sigma"], p["sigma_hat"], p["remask"], p["K"],
                                   seed=0, step=0)


def _allocated_bytes(fn) -> list[int]:
    """Sizes of the CPU allocations made while ``fn`` runs (torch's profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]


def test_cpu_step_allocates_no_random_number_buffers():
    """No allocation grows with the number of uniforms: an all-masked Adult step draws B x L race
    uniforms (L = 113); the cpu step's largest allocation is an output ([B, n] or [B, m])."""
    need("cpu")
    B = 4000
    p = _problem(B=B, n=6, K=ADULT_K, masked=1.0, dtype=torch.float64)
    args = (p["x_num"], p["x_cat"], p["denoised"], p["logits"], p["sigma_hat"], p["sigma_next"], p["K"],
            p["alpha_t"], p["alpha_s"])
    outputs = B * max(6, len(ADULT_K)) * 8
    with diffkern.use_backend("cpu"):
        fused = _allocated_bytes(lambda: diffkern.ops.tabdiff_step(*args, seed=0, step=3))
    with diffkern.use_backend("reference"):
        reference = _allocated_bytes(lambda: diffkern.ops.tabdiff_step(*args, seed=0, step=3))
    assert max(fused) <= outputs, sorted(fused)[-5:]
    assert max(reference) >= B * 113 * 8      # the probe sees the reference's [B, L] uniforms (it can fail)


@pytest.mark.parametrize("backend", backends_of("tabdiff_step"))
def test_opcheck_and_compile(backend):
    """The custom ops' schemas, fake kernels and autograd registration (torch.library.opcheck),
    and one fused-step graph under torch.compile(fullgraph=True) giving the eager result."""
    need(backend)
    if backend == "triton":
        pytest.skip("opcheck moves nothing to the Triton device; the triton rows above cover the backend")
    p = _problem(B=20, n=6, K=ADULT_K)
    ops = torch.ops.diffkern
    step_args = (p["x_num"], p["x_cat"], p["denoised"], p["logits"], p["sigma_hat"], p["sigma_next"], p["K"],
                 p["alpha_t"], p["alpha_s"])
    missing = torch.rand(p["x_cat"].shape) < 0.5
    with diffkern.use_backend(backend):
        torch.library.opcheck(ops.tabdiff_churn.default, (p["x_num"], p["x_cat"], p["sigma"], p["sigma_hat"],
                                                          p["remask"], p["K"], 3, 2, 0, None, None))
        torch.library.opcheck(ops.tabdiff_step.default, (*step_args, 3, 2, 0, None))
        torch.library.opcheck(ops.tabdiff_heun.default, (p["x_num"], p["x_num"], p["denoised"], p["x_num"],
                                                         p["sigma_hat"], p["sigma_next"]))
        torch.library.opcheck(ops.tabdiff_observe.default, (p["x_num"], p["x_cat"], p["x_num"], p["x_cat"],
                                                            p["x_num"] > 0, missing, p["sigma_next"], p["remask"],
                                                            p["K"], 3, 2, 0, None, None))
        compiled = torch.compile(lambda *a: diffkern.ops.tabdiff_step(*a, seed=3, step=2), fullgraph=True)
        for got, want in zip(compiled(*step_args), diffkern.ops.tabdiff_step(*step_args, seed=3, step=2)):
            assert torch.equal(got, want)
