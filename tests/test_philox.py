"""The shared counter-based stream (diffkern.ops.philox): known answers, the PoE tokens it
pinned before it moved out of the PoE files, and the derived variates' distributions."""

import pytest
import torch
from scipy import stats

import diffkern
from diffkern.ops import philox, poe_draft, poe_verify

from conftest import available


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


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_poe_tokens_pinned(backend):
    if not available(backend):
        pytest.skip(f"{backend} backend unavailable")
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
