"""Bench cases of the PoE family (``diffkern bench``): poe_verify at PoE-Bridge's shapes
(B=1, K=4, W=32, V=151,667) and poe_draft at its DLM span (W=256, top_p=0.95).

``eager`` is an honest plain-torch implementation in the style of the official code
(juntongshi48/poe-bridge): it materialises the tempered proposal, the PoE target and the ratios
with full softmaxes over ``[K, W, V]`` (and a full sort for top-p), in float32. The float64
``reference`` backend is reported too, and the compiled backends the op registers for the
device (``cpu``; ``triton`` on a GPU). All impls consume the same explicit uniforms, so tokens
agree (up to float rounding at CDF boundaries) and errors compare log-weights / log-q.
"""

from __future__ import annotations

import functools
from typing import Iterator

import torch

import diffkern
from diffkern.bench.harness import Case, CasePlan, compile_lazily, fast_backends, with_backends

V_FULL = 151_667
TEMPERATURES = (0.2, 0.367, 0.533, 0.7)   # K = 4 mixed-temperature particles


def eager_verify(dlm, ar, drafts, temps, weight, uniforms):
    """Official-style verify: softmax p, q over [B, K, W, V], ratio test, residual, IS weights."""
    B, K, W, V = ar.shape
    T = temps.float().view(1, K, 1, 1)
    l_d = dlm.float().unsqueeze(1).repeat(1, K, 1, 1)                 # the official .repeat
    l_a = ar.float()
    q = torch.softmax(l_d / T, dim=-1)
    p = torch.softmax((weight * l_d + (1 - weight) * l_a) / T, dim=-1)
    log_a = torch.log_softmax(l_a / T, dim=-1)
    x = drafts.unsqueeze(-1)
    qx, px = q.gather(-1, x).squeeze(-1), p.gather(-1, x).squeeze(-1)
    accept = uniforms[..., :W].float() < px / qx
    n = torch.cumprod(accept.long(), -1).sum(-1)                      # [B, K]
    j = n.clamp_max(W - 1).view(B, K, 1, 1).expand(B, K, 1, V)
    resid = (p.gather(2, j) - q.gather(2, j)).squeeze(2).clamp_min(0)
    resid = resid / resid.sum(-1, keepdim=True)
    cdf = resid.cumsum(-1)
    y = torch.searchsorted(cdf, uniforms[..., W:].float()).clamp_max(V - 1)   # [B, K, 1]
    tokens = drafts.clone()
    corrected = n < W
    tokens.scatter_(2, n.clamp_max(W - 1).unsqueeze(-1),
                    torch.where(corrected.unsqueeze(-1), y, tokens.gather(2, n.clamp_max(W - 1).unsqueeze(-1))))
    log_p = torch.log(p)
    terms = (log_a.gather(-1, tokens.unsqueeze(-1)) - log_p.gather(-1, tokens.unsqueeze(-1))).squeeze(-1)
    emitted = torch.arange(W, device=ar.device).view(1, 1, W) <= n.unsqueeze(-1)
    lw = torch.where(emitted, terms, torch.zeros_like(terms)).sum(-1)
    return lw, tokens


def eager_draft(dlm, temps, top_p, uniforms):
    """Official-style draft: repeat K times, tempered softmax, sort-based top-p, inverse CDF."""
    B, W, V = dlm.shape
    K = temps.shape[0]
    probs = torch.softmax(dlm.float().unsqueeze(1).repeat(1, K, 1, 1) / temps.float().view(1, K, 1, 1), -1)
    sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep_sorted = (sp.cumsum(-1) - sp) < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    q = torch.where(keep, probs, torch.zeros_like(probs))
    cdf = q.cumsum(-1)
    target = uniforms.float().unsqueeze(-1) * cdf[..., -1:]
    x = torch.searchsorted(cdf, target, right=True).clamp_max(V - 1)
    log_q = (q.gather(-1, x) / cdf[..., -1:]).log().squeeze(-1)
    return log_q, x.squeeze(-1)


def _on(backend, fn):
    def run():
        with diffkern.use_backend(backend):
            return fn()
    return run


EAGER = ("eager", "torch.compile(eager)", "reference")   # the plain-torch rows of every case


def _name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def _verify_case(V: int, W: int, dtype: torch.dtype, device: str, label: str) -> Case:
    # one function per case: its closures own their tensors (nothing rebinds them later, and
    # they are freed with the case); inputs are made on the CPU so every device sees the same
    g = torch.Generator().manual_seed(0)
    B, K = 1, len(TEMPERATURES)
    dlm = (torch.randn(B, W, V, generator=g) * 4).to(dtype).to(device)
    ar = (torch.randn(B, K, W, V, generator=g) * 4).to(dtype).to(device)
    temps = torch.tensor(TEMPERATURES, device=device)
    drafts, _ = diffkern.ops.poe_draft(dlm, temps, seed=0)
    u = torch.rand(B, K, W + 1, generator=g, dtype=torch.float64).to(device)
    w = 0.3

    def verify_op():
        r = diffkern.ops.poe_verify(dlm, ar, drafts, temps, weight=w, uniforms=u)
        return r.log_weights, r.tokens

    compiled = compile_lazily(eager_verify)
    impls, skipped = with_backends("poe_verify", device, {
        "eager": lambda: eager_verify(dlm, ar, drafts, temps, w, u),
        "torch.compile(eager)": lambda: compiled(dlm, ar, drafts, temps, w, u),
        "reference": _on("reference", verify_op),
    }, lambda b: _on(b, verify_op))
    return Case(op="poe_verify", label=label, impls=impls, skipped=skipped,
                baseline="eager", compiled="torch.compile(eager)",
                bytes_moved=(B * W * V + B * K * W * V) * dlm.element_size(), elements=K * W * V,
                extra={"torch.exp": lambda: torch.exp(ar)})


def _draft_case(V: int, W: int, top_p: float, dtype: torch.dtype, device: str, label: str) -> Case:
    g = torch.Generator().manual_seed(1)
    B, K = 1, len(TEMPERATURES)
    temps = torch.tensor(TEMPERATURES, device=device)
    dlm = (torch.randn(B, W, V, generator=g) * 4).to(dtype).to(device)
    ud = torch.rand(B, K, W, generator=g, dtype=torch.float64).to(device)

    def draft_op():
        tok, log_q = diffkern.ops.poe_draft(dlm, temps, top_p=top_p, uniforms=ud)
        return log_q, tok

    compiled = compile_lazily(eager_draft)
    impls, skipped = with_backends("poe_draft", device, {
        "eager": lambda: eager_draft(dlm, temps, top_p, ud),
        "torch.compile(eager)": lambda: compiled(dlm, temps, top_p, ud),
        "reference": _on("reference", draft_op),
    }, lambda b: _on(b, draft_op))
    return Case(op="poe_draft", label=label, impls=impls, skipped=skipped,
                baseline="eager", compiled="torch.compile(eager)",
                bytes_moved=B * W * V * dlm.element_size(), elements=K * W * V,
                extra={"torch.exp": lambda: torch.exp(dlm)})


def plan(quick: bool, device: str = "cpu") -> Iterator[CasePlan]:
    V = 4099 if quick else V_FULL
    B, K, top_p = 1, len(TEMPERATURES), 0.95
    for dtype in (torch.float32, torch.bfloat16):
        W = 4 if quick else 32
        label = f"B={B} K={K} W={W} V={V} {_name(dtype)}"
        yield CasePlan("poe_verify", label, (*EAGER, *fast_backends("poe_verify", device), "torch.exp"),
                       functools.partial(_verify_case, V, W, dtype, device, label))
        W = 8 if quick else 256
        label = f"B={B} K={K} W={W} V={V} top_p={top_p} {_name(dtype)}"
        yield CasePlan("poe_draft", label, (*EAGER, *fast_backends("poe_draft", device), "torch.exp"),
                       functools.partial(_draft_case, V, W, top_p, dtype, device, label))
