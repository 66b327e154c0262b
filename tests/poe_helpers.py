"""Shared helpers of the PoE operator tests (tests/test_poe_*.py): logits with masked vocabulary,
the reference's float64 rows, explicit uniforms placed far from every rounding boundary, and a
runner on one backend.

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

import torch

import diffkern
from diffkern.ops import poe

from conftest import TRITON_DEVICE, triton_call


def interpreter_ok(backend, V, W, K):
    # The Triton interpreter costs ms per program-iteration: keep its share small (its tiles of up
    # to 1024 rows x 4096 columns make every case below a few seconds, V = 32000 top_p < 1 included).
    return backend != "triton" or TRITON_DEVICE == "cuda" or V * W * K <= 32000 * 5 * 4


def make_logits(dtype, B, K, W, V, seed, mask=True, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(B, W, V, generator=g) * scale).to(dtype)
    a = (torch.randn(B, K, W, V, generator=g) * scale).to(dtype)
    if mask and V > 3:
        d[0, 0, : V // 3] = -math.inf        # masked vocabulary in the DLM
        a[:, 0, -1, V // 2:] = -math.inf     # ... and in the AR model
    temps = torch.tensor([0.6, 1.0, 1.7, 0.8][:K])
    return d, a, temps


def reference_rows(d4, a, temps, w, top_p, parity=False):
    """float64 q, p rows [B, K, W, V] exactly as the reference defines them."""
    T = temps.double().view(1, -1, 1) if temps.dim() == 1 else temps.double().unsqueeze(-1)
    q = torch.stack([poe._proposal(d4[:, :, j], T.squeeze(-1).expand(d4.shape[0], -1), 1.0 if parity else top_p)
                     for j in range(d4.shape[2])], dim=2)
    poe_l = poe._weighted(w, d4.double()) + poe._weighted(1 - w, a.double())
    p = torch.softmax(poe_l / T.unsqueeze(-1), dim=-1)
    return q, p


def mid_uniform(weights, g, min_mass=1e-3):
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
            u[b, k, j], _ = mid_uniform(q[b, k], g)
    return u


def safe_verify_uniforms(d, a, drafts, temps, w, top_p, parity=False, seed=0):
    B, K, W, V = a.shape
    d4 = d.unsqueeze(1).expand(B, K, W, V)
    q, p = reference_rows(d4, a, temps, w, top_p, parity)
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
            u[b, k, W], _ = mid_uniform(resid, g)
    return u


def run_on(backend, fn, *args, **kwargs):
    with diffkern.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # numpy noise of the Triton interpreter
        if backend == "triton":                            # CUDA tensors unless interpreted (conftest)
            return triton_call(fn, *args, **kwargs)
        return fn(*args, **kwargs)
