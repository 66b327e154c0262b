"""The shared counter-based stream (diffkern.ops.philox): known answers, the PoE tokens it
pinned before it moved out of the PoE files, and the derived variates' distributions."""

import pytest
import torch
from scipy import stats

import diffkern
from diffkern.ops import philox, poe_draft, poe_verify

from conftest import TRITON_DEVICE, available, backends_of, need


def test_known_answer():
    z = torch.zeros(1, dtype=torch.int64)
    assert [int(x) for x in philox.philox4x32_10(0, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(x) for x in philox.philox4x32_10(2 ** 64 - 1, f, f, f, f)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


# Tokens of a fixed seed recorded before the stream moved into diffkern.ops.philox (commit 28bef9c).
_PINNED_DRAFT = [[[28, 32, 34, 23, 34], [23, 29, 34, 23, 19], [6, 28, 17, 36, 22]],
                 [[31, 3, 5, 30, 4], [31, 3, 3, 28, 4], [8, 15, 36, 30, 4]]]
_PINNED_ACCEPTED = [[2, 3, 3], [1, 3, 3]]
_PINNED_VERIFY = [[[28, 32, 33, 23, 34], [23, 29, 34, 0, 19], [6, 28, 17, 16, 22]],
                  [[31, 26, 5, 30, 4], [31, 3, 3, 34, 4], [8, 15, 36, 12, 4]]]


@pytest.mark.parametrize("backend", backends_of("poe_draft"))
def test_poe_tokens_pinned(backend):
    need(backend)
    g = torch.Generator().manual_seed(0)
    dlm = torch.randn(2, 5, 37, generator=g)
    ar = torch.randn(2, 3, 5, 37, generator=g)
    temps = [0.7, 1.0, 1.3]
    with diffkern.use_backend(backend):
        tokens, _ = poe_draft(dlm, temps, top_p=0.9, seed=1234, offset=7)
        out = poe_verify(dlm, ar, tokens, temps, weight=0.5, top_p=0.9, seed=1234, offset=7)
    assert tokens.tolist() == _PINNED_DRAFT
    assert out.num_accepted.tolist() == _PINNED_ACCEPTED
    assert out.tokens.tolist() == _PINNED_VERIFY


def test_grid_is_a_window_of_the_global_rows():
    whole = philox.uniforms(9, 3, 4, 10, 6)
    part = philox.uniforms(9, 3, 4, 4, 6, row_start=5)
    assert torch.equal(whole[5:9], part)
    n_whole = philox.normals(9, 3, 4, 10, 6)
    assert torch.equal(n_whole[2:7], philox.normals(9, 3, 4, 5, 6, row_start=2))


def test_streams_are_disjoint_by_tag_and_offset():
    a = philox.uniforms(1, 0, 4, 8, 8)
    assert not torch.equal(a, philox.uniforms(1, 0, 5, 8, 8))
    assert not torch.equal(a, philox.uniforms(1, 1, 4, 8, 8))
    assert not torch.equal(a, philox.uniforms(2, 0, 4, 8, 8))


def test_variates_follow_their_distributions():
    u = philox.uniforms(5, 0, 6, 200, 100).flatten()
    assert bool(((u > 0) & (u < 1)).all())
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-4
    z = philox.normals(5, 0, 4, 200, 100).flatten()
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


@pytest.mark.parametrize("bad", [dict(tag=16), dict(tag=-1), dict(offset=2 ** 60), dict(offset=-1)])
def test_bad_keys(bad):
    args = dict(seed=0, offset=0, tag=1) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        philox.uniforms(args["seed"], args["offset"], args["tag"], 2, 2)


# ---------------------------------------------------------------------------------------------
# The C++ header (csrc/include/diffkern/philox.h) and the Triton helper (kernels/philox.py) give
# the spec's bits: uniforms bit for bit, normals to the last bits of the platform's log / cos.
# ---------------------------------------------------------------------------------------------

KEYS = [(0, 0, 1, 5, 9, 0), (2 ** 62 + 12345, 2 ** 40 + 7, 3, 4, 33, 11), (1, 2 ** 60 - 1, 15, 3, 3, 2 ** 31 + 5),
        (2 ** 63 - 1, 0, 0, 1, 1, 2 ** 32 - 1)]


def _assert_same_stream(uniforms, normals, key):
    seed, offset, tag, rows, cols, row_start = key
    assert torch.equal(uniforms, philox.uniforms(seed, offset, tag, rows, cols, row_start=row_start))
    torch.testing.assert_close(normals, philox.normals(seed, offset, tag, rows, cols, row_start=row_start),
                               rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("key", KEYS)
def test_cpp_header_matches_the_spec(key):
    if not available("cpu"):
        pytest.skip("cpu backend unavailable")
    seed, offset, tag, rows, cols, row_start = key
    _assert_same_stream(torch.ops.diffkern.philox_uniforms(seed, offset, tag, rows, cols, row_start),
                        torch.ops.diffkern.philox_normals(seed, offset, tag, rows, cols, row_start), key)
    _assert_same_stream(philox.fast_uniforms(seed, offset, tag, rows, cols, row_start=row_start),
                        philox.fast_normals(seed, offset, tag, rows, cols, row_start=row_start), key)


def test_cpp_op_rejects_bad_keys():
    if not available("cpu"):
        pytest.skip("cpu backend unavailable")
    with pytest.raises(ValueError, match="tag"):
        torch.ops.diffkern.philox_uniforms(0, 0, 16, 2, 2)
    with pytest.raises(ValueError, match="offset"):
        torch.ops.diffkern.philox_normals(0, 2 ** 60, 1, 2, 2)


try:
    import triton
    import triton.language as tl

    from diffkern.kernels import philox as kphilox
except ImportError:   # no triton: the cpu tests above still run
    kphilox = None

if kphilox is not None:
    @triton.jit
    def _draw(rows_ptr, cols_ptr, u_ptr, z_ptr, n, seed, offset, tag, BLOCK: tl.constexpr):
        """What a kernel author writes: the helpers at arbitrary (row, column) indices."""
        i = tl.arange(0, BLOCK)
        mask = i < n
        row = tl.load(rows_ptr + i, mask=mask, other=0)
        col = tl.load(cols_ptr + i, mask=mask, other=0)
        tl.store(u_ptr + i, kphilox.uniform(seed, offset, tag, row, col), mask=mask)
        tl.store(z_ptr + i, kphilox.normal(seed, offset, tag, row, col), mask=mask)


def _draw_at(seed, offset, tag, rows, cols):
    u = torch.empty(rows.shape, dtype=torch.float64)
    z = torch.empty(rows.shape, dtype=torch.float64)
    _draw[(1,)](rows, cols, u, z, rows.numel(), seed, offset, tag, BLOCK=triton.next_power_of_2(rows.numel()))
    return u, z


@pytest.mark.parametrize("key", KEYS)
def test_triton_helper_matches_the_spec(key):
    if kphilox is None or not available("triton"):
        pytest.skip("triton backend unavailable")
    seed, offset, tag, rows, cols, row_start = key
    _assert_same_stream(kphilox.uniforms(seed, offset, tag, rows, cols, row_start=row_start, device="cpu"),
                        kphilox.normals(seed, offset, tag, rows, cols, row_start=row_start, device="cpu"), key)
    g = torch.Generator().manual_seed(seed % 1000)
    r = torch.randint(0, 2 ** 32, (37,), generator=g, dtype=torch.int64)
    c = torch.randint(0, 2 ** 32, (37,), generator=g, dtype=torch.int64)
    u, z = _draw_at(seed, offset, tag, r, c)
    assert torch.equal(u, philox.uniform(seed, offset, tag, r, c))
    torch.testing.assert_close(z, philox.normal(seed, offset, tag, r, c), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("seed", [2 ** 64 - 5, 2 ** 63, 2 ** 64 - 2 ** 40 + 3])
def test_triton_helper_reads_a_uint64_seed_as_signed_int64(seed):
    """The op schemas carry a seed >= 2**63 as the int64 with its bits (a small negative one is
    an int32 to Triton): the helpers draw the uint64 seed's stream from either spelling."""
    if kphilox is None or not available("triton"):
        pytest.skip("triton backend unavailable")
    expect = philox.uniforms(seed, 49, 6, 3, 5, row_start=10_000)
    for spelling in (seed, seed - 2 ** 64):
        drawn = kphilox.uniforms(spelling, 49, 6, 3, 5, row_start=10_000, device=TRITON_DEVICE)
        assert torch.equal(drawn.cpu(), expect)
