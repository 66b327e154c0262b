"""PoE operator family: speculative decoding through a Product-of-Experts (PoE-Bridge), and a
fused product-of-experts log-softmax (classifier-free guidance is a PoE with weights (1+s, -s)).

Notation (per batch item b, particle k, window position j; ``T = T_k``, ``w = weight``):

* proposal  ``q_{k,j} = nucleus_top_p(softmax(l_D[j] / T))``: softmax of the tempered DLM logits
  restricted to its top-p nucleus (the smallest set of highest-probability tokens whose mass is
  >= top_p, ties broken toward the lower token id) and renormalised. ``top_p = 1`` keeps every
  token of positive probability.
* PoE target ``p_{k,j} = softmax((w l_D[j] + (1 - w) l_AR[k, j]) / T)`` with ``0 * (-inf) = 0``
  (an expert of weight 0 has no say).
* AR target ``a_{k,j} = softmax(l_AR[k, j] / T*)``, ``T* = target_temperature`` (default T_k).

``poe_draft`` samples ``x_{k,j} ~ q_{k,j}``; ``poe_verify`` runs the speculative-sampling test
(accept while ``u_j < p(x_j) / q(x_j)``, in log space), resamples the first rejected position from
``normalise((p - q)_+)`` (``p`` when that is zero), and accumulates importance log-weights
``sum_emitted [log a(x_j) - log p(x_j)]`` toward the AR target.

Randomness (identical on every backend)
---------------------------------------
Every random number is a float64 uniform in (0, 1) from a counter-based Philox-4x32-10 stream:
key = the 64-bit ``seed``; counter = ``(column, row, offset_lo32, offset_hi28 | tag << 28)`` with
``row = b * K + k`` and the purpose ``tag`` (1 = draft, 2 = acceptance, 3 = residual), so draft
and verification noise are disjoint streams. The uniform is ``(2 m + 1) 2^-53`` with ``m`` the 52
bits ``(x1 >> 12) << 32 | x0`` of the first two Philox output words (exact in float64, never 0
or 1). This is the shared stream of :mod:`diffkern.ops.philox` (``csrc/include/diffkern/philox.h``
in C++, ``kernels/philox.py`` in Triton: the same bits), filled once per call on the host side
of the operator, so a fixed ``seed``/``offset`` gives the same tokens on every backend up to
floating-point ties. ``seed=None`` draws a fresh seed from torch's default
generator; a ``torch.Generator`` is resolved to a seed in the Python wrapper (custom ops cannot
take generators).

Explicit ``uniforms=`` replace the stream (values in [0, 1), any float dtype, used as float64):

* ``poe_draft``: ``[B, K, W]``; ``x = `` the first token id (in id order) whose cumulative
  nucleus mass ``sum_{v <= x, v in nucleus} q(v)`` exceeds ``u`` (inverse CDF in token-id order).
* ``poe_verify``: ``[B, K, W + 1]``; ``[..., j]`` (j < W) is the acceptance uniform of position
  j, ``[..., W]`` drives the inverse-CDF (token-id order) residual sample.

With explicit uniforms every backend returns the reference's tokens and ``num_accepted``
exactly, except when a uniform lies within floating-point error (~1e-6 relative) of a CDF
boundary, an acceptance ratio, or when a nucleus boundary's cumulative mass is within rounding
of ``top_p``: the reference accumulates in float64, the fast backends exp in float32 and
accumulate the CDFs in float64 in token-id order. Tests pick uniforms away from such boundaries.

Backends: ``reference`` (this file, float64, sort-based nucleus: the spec), ``cpu``
(``csrc/cpu/poe.cpp`` + ``csrc/include/diffkern/poe.h``: one pass per row, radix-select nucleus,
no sort), ``triton`` (``kernels/poe.py``: the same radix-select nucleus, 4 bits per pass).

The fast backends share one contract, so errors and the verify epilogue are written once, here:
their kernels do not raise on bad logits but count them in a status tensor ``[E, 3]`` of (NaN,
+inf, entirely -inf rows) per logits input (``poe_verify``: dlm_logits, ar_logits and the PoE
logits); ``poe_verify``'s kernels return the first rejected index, the residual token and the
two log-weight terms (accepted prefix, residual token), and :func:`_finish_verify` emits the
corrected tokens, the parity mean and the outgoing log-weights.

``parity=True`` in :func:`poe_verify` reproduces the official code's choices
(juntongshi48/poe-bridge, ``dream/generation_utils.py``):

1. the acceptance ratio and residual use the *untruncated* ``softmax(l_D / T)`` as q (the
   official sampler draws from a nucleus but verifies against the full softmax);
2. ``log_weights`` accumulates the official "energy": the mean over emitted tokens of the raw,
   untempered logit difference ``l_AR(x) - l_D(x)`` (no log-softmax, no temperature, no w),
   instead of the importance log-weight.

Not reproduced even with ``parity=True`` (decoder-level or dtype choices): the official nucleus
is taken on the *untempered* DLM logits (ours is on the tempered ones, so ``q`` is exactly the
distribution drawn from); its acceptance uniforms are bf16; EOS forces acceptance of position 0;
particle selection is a greedy argmax of the energy (that lives in ``diffkern.poe_bridge``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._dispatch import Operator
from . import _checks, philox
from ._checks import FAST_DTYPES

__all__ = ["poe_draft", "poe_verify", "product_of_experts", "PoEVerifyResult", "philox_uniforms",
           "TAG_DRAFT", "TAG_ACCEPT", "TAG_RESIDUAL"]

TAG_DRAFT, TAG_ACCEPT, TAG_RESIDUAL = (philox.TAGS[k] for k in ("poe_draft", "poe_accept", "poe_residual"))

# The input errors of the family, written once (the reference raises them itself; the fast
# backends' status counters are raised from in _raise_status).
_POS_INF = "{name}: contains +inf logits (only -inf, i.e. masked tokens, are legal)"
_NAN = "{name}: contains NaN logits; pass allow_nan=True to treat NaN as -inf (masked)"
_EMPTY_ROW = "{name}: every row needs at least one finite logit; {which} is entirely -inf"
_EMPTY_POE = ("dlm_logits/ar_logits: a row of the PoE logits w*l_D + (1-w)*l_AR is entirely -inf "
              "(no token allowed by both experts){where}")


class PoEVerifyResult(NamedTuple):
    num_accepted: Tensor   # [B, K] int64: first rejected index, W if none
    tokens: Tensor         # [B, K, W] int64: drafts, with the corrected token at num_accepted
    log_weights: Tensor    # [B, K] float32: incoming + sum over emitted tokens
    corrected: Tensor      # [B, K] bool: num_accepted < W (a residual token was emitted)


def philox_uniforms(seed: int, offset: int, tag: int, rows: int, cols: int,
                    device: Union[str, torch.device] = "cpu") -> Tensor:
    """``[rows, cols]`` float64 uniforms in (0, 1) of the stream (seed, offset, tag) (see module doc);
    :func:`diffkern.ops.philox.uniforms`."""
    return philox.uniforms(seed, offset, tag, rows, cols, device=device)


# --------------------------------------------------------------------------------------------
# Reference backend (plain torch, float64; the spec)
# --------------------------------------------------------------------------------------------

def _nan_to_neg_inf(x: Tensor) -> Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, -math.inf), x)


def _weighted(w: float, x: Tensor) -> Tensor:
    """``w * x`` with ``0 * (-inf) = 0``: an expert of weight 0 has no say."""
    return torch.zeros_like(x) if w == 0.0 else w * x


def nucleus_mask(probs: Tensor, top_p: float) -> Tensor:
    """Boolean mask of the top-p nucleus of normalised ``probs [..., V]``: the smallest set of the
    highest-probability tokens (ties toward the lower id) with mass >= top_p; never a p = 0 token."""
    positive = probs > 0
    if top_p >= 1.0:
        return positive
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p       # mass strictly before each rank
    keep = (before < top_p) & (sorted_p > 0)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def _proposal(l_dlm: Tensor, temps: Tensor, top_p: float) -> Tensor:
    """q: ``[..., V]`` float64 probabilities of the tempered DLM nucleus."""
    q = torch.softmax(l_dlm.double() / temps.unsqueeze(-1), dim=-1)
    q = torch.where(nucleus_mask(q, top_p), q, torch.zeros_like(q))
    return q / q.sum(-1, keepdim=True)


def _inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """First index (token-id order) whose cumulative weight exceeds ``u * total``."""
    cdf = torch.cumsum(weights, dim=-1)
    target = u.unsqueeze(-1) * cdf[..., -1:]
    idx = (cdf <= target).sum(-1)
    return idx.clamp_max(weights.shape[-1] - 1)


def _check_logits(name: str, x: Tensor, allow_nan: bool) -> None:
    if bool(torch.isposinf(x).any()):
        raise ValueError(_POS_INF.format(name=name))
    if not allow_nan and bool(torch.isnan(x).any()):
        raise ValueError(_NAN.format(name=name))


def _check_rows(name: str, logits: Tensor) -> None:
    finite_any = (logits > -math.inf).any(-1)
    if not bool(finite_any.all()):
        bad = tuple(int(i) for i in (~finite_any).nonzero()[0])
        raise ValueError(_EMPTY_ROW.format(name=name, which=f"row {bad} of shape {tuple(logits.shape)}"))


def draft_reference(dlm_logits: Tensor, temperatures: Tensor, top_p: float, uniforms: Tensor,
                    allow_nan: bool) -> tuple[Tensor, Tensor]:
    B, W, V = dlm_logits.shape
    K = temperatures.shape[1]
    _check_logits("dlm_logits", dlm_logits, allow_nan)
    logits = _nan_to_neg_inf(dlm_logits.double()) if allow_nan else dlm_logits.double()
    _check_rows("dlm_logits", logits)
    tokens = torch.empty(B, K, W, dtype=torch.int64, device=dlm_logits.device)
    log_q = torch.empty(B, K, W, dtype=torch.float32, device=dlm_logits.device)
    temps = temperatures.double()
    for j in range(W):                                              # memory: [B, K, V] per step
        q = _proposal(logits[:, j].unsqueeze(1).expand(B, K, V), temps, top_p)
        x = _inverse_cdf(q, uniforms[:, :, j].double())
        tokens[:, :, j] = x
        log_q[:, :, j] = q.gather(-1, x.unsqueeze(-1)).squeeze(-1).log().float()
    return tokens, log_q


def verify_reference(dlm_logits: Tensor, ar_logits: Tensor, draft_tokens: Tensor, temperatures: Tensor,
                     log_weights: Tensor, weight: float, top_p: float, target_temperature: float,
                     uniforms: Tensor, parity: bool, allow_nan: bool):
    """``dlm_logits`` and ``ar_logits`` are ``[B, K, W, V]`` here (dlm possibly stride-0 in K)."""
    _check_logits("dlm_logits", dlm_logits, allow_nan)
    _check_logits("ar_logits", ar_logits, allow_nan)
    B, K, W, V = ar_logits.shape
    w = weight
    temps = temperatures.double()                                   # [B, K]
    t_star = temps if target_temperature <= 0 else torch.full_like(temps, target_temperature)
    u = uniforms.double()

    def row(j_index: Tensor):
        """Everything about the rows (b, k, j_index[b, k]): [B, K, V] float64."""
        jj = j_index.view(B, K, 1, 1).expand(B, K, 1, V)
        l_d = dlm_logits.gather(2, jj).squeeze(2).double()
        l_a = ar_logits.gather(2, jj).squeeze(2).double()
        if allow_nan:
            l_d, l_a = _nan_to_neg_inf(l_d), _nan_to_neg_inf(l_a)
        T = temps.unsqueeze(-1)
        q = _proposal(l_d, temps, 1.0 if parity else top_p)
        log_p = torch.log_softmax((_weighted(w, l_d) + _weighted(1.0 - w, l_a)) / T, dim=-1)
        log_a = torch.log_softmax(l_a / t_star.unsqueeze(-1), dim=-1)
        return l_d, l_a, q, log_p, log_a

    stats = []   # per j: (log q(x), log p(x), log a(x), l_d(x), l_a(x))
    accept = torch.empty(B, K, W, dtype=torch.bool, device=ar_logits.device)
    for j in range(W):
        j_index = torch.full((B, K), j, dtype=torch.int64, device=ar_logits.device)
        l_d, l_a, q, log_p, log_a = row(j_index)
        for name, t in (("dlm_logits", l_d), ("ar_logits", l_a)):
            _check_rows(name, t)
        if not bool(torch.isfinite(log_p.amax(-1)).all()):
            raise ValueError(_EMPTY_POE.format(where=f" at window position {j}"))
        x = draft_tokens[:, :, j].unsqueeze(-1)
        qx = q.gather(-1, x).squeeze(-1)
        lpx = log_p.gather(-1, x).squeeze(-1)
        accept[:, :, j] = (qx > 0) & (u[:, :, j].log() < lpx - qx.log())
        stats.append((lpx, log_a.gather(-1, x).squeeze(-1), l_d.gather(-1, x).squeeze(-1),
                      l_a.gather(-1, x).squeeze(-1)))

    num_accepted = torch.cumprod(accept.long(), dim=-1).sum(-1)   # first rejected index
    corrected = num_accepted < W
    tokens = draft_tokens.clone()

    # Emitted-token terms of the accepted prefix.
    pos = torch.arange(W, device=ar_logits.device).view(1, 1, W)
    emitted_accepted = pos < num_accepted.unsqueeze(-1)             # [B, K, W]
    lpx, lax, ldx, lrx = (torch.stack(s, -1) for s in zip(*stats))  # [B, K, W] each
    if parity:
        term = torch.where(emitted_accepted, lrx - ldx, torch.zeros_like(lrx)).sum(-1)
    else:
        term = torch.where(emitted_accepted, lax - lpx, torch.zeros_like(lax)).sum(-1)

    # Residual sample at the first rejected position.
    if bool(corrected.any()):
        j_index = num_accepted.clamp_max(W - 1)
        l_d, l_a, q, log_p, log_a = row(j_index)
        p = log_p.exp()
        resid = (p - q).clamp_min(0.0)
        resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, p)
        y = _inverse_cdf(resid, u[:, :, W])                          # [B, K]
        y1 = y.unsqueeze(-1)
        if parity:
            extra = (l_a.gather(-1, y1) - l_d.gather(-1, y1)).squeeze(-1)
        else:
            extra = (log_a.gather(-1, y1) - log_p.gather(-1, y1)).squeeze(-1)
        term = term + torch.where(corrected, extra, torch.zeros_like(extra))
        tokens.scatter_(2, j_index.unsqueeze(-1),
                        torch.where(corrected, y, tokens.gather(2, j_index.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1))
    if parity:
        term = term / (num_accepted + corrected.long()).clamp_min(1).double()
    out_lw = (log_weights.double() + term).float()
    return num_accepted, tokens, out_lw, corrected


def product_of_experts_reference(logits: Sequence[Tensor], weights: Sequence[float], temperature: float) -> Tensor:
    compute = torch.float64 if any(t.dtype == torch.float64 for t in logits) else torch.float32
    acc, masked = None, None
    for lg, w in zip(logits, weights):
        lg = lg.to(torch.float64)
        term = _weighted(w, torch.where(lg == -math.inf, torch.zeros_like(lg), lg))
        acc = term if acc is None else acc + term
        if w != 0.0:   # a token masked (-inf) by any expert with a say is masked in the product
            masked = (lg == -math.inf) if masked is None else masked | (lg == -math.inf)
    if masked is not None:
        acc = acc.masked_fill(masked, -math.inf)
    return torch.log_softmax(acc / temperature, dim=-1).to(compute)


# --------------------------------------------------------------------------------------------
# Value checks (inside the ops: run on every backend, outside any graph)
# --------------------------------------------------------------------------------------------

def _check_temperatures(name: str, temps: Tensor) -> None:
    t = temps.detach()
    if not bool((torch.isfinite(t) & (t > 0)).all()):
        raise ValueError(f"{name}: every temperature must be finite and > 0, got {t.flatten()[:8].tolist()}")


def _check_uniforms(u: Tensor) -> None:
    if not bool(((u >= 0) & (u < 1)).all()):
        raise ValueError("uniforms: every value must lie in [0, 1)")


def _check_tokens(tokens: Tensor, V: int) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
        raise ValueError(f"draft_tokens: token ids must lie in [0, V={V}), got range "
                         f"[{int(tokens.min())}, {int(tokens.max())}]")


# --------------------------------------------------------------------------------------------
# Fast backends (cpu, triton): one contract, so errors and the epilogue are written once
# --------------------------------------------------------------------------------------------

def _raise_status(status: Tensor, names: Sequence[Optional[str]], allow_nan: bool) -> None:
    """Raise the first error of a fast kernel's status ``[E, 3]`` = (NaN, +inf, entirely -inf
    rows) per logits input named in ``names`` (None: the PoE logits), in the reference's order."""
    counts = status.tolist()
    for name, (nan, pinf, _) in zip(names, counts):
        if name is not None and pinf:
            raise ValueError(_POS_INF.format(name=name))
        if name is not None and nan and not allow_nan:
            raise ValueError(_NAN.format(name=name))
    for name, (_, _, empty) in zip(names, counts):
        if empty:
            raise ValueError(_EMPTY_POE.format(where="") if name is None else
                             _EMPTY_ROW.format(name=name, which="a row"))


def _finish_draft(raw, dlm_logits, temperatures, top_p, uniforms, allow_nan):
    """``(tokens, log_q, status)`` of a fast draft kernel -> ``(tokens, log_q)``."""
    tokens, log_q, status = raw
    _raise_status(status, ("dlm_logits",), allow_nan)
    return tokens, log_q


def _finish_verify(raw, dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
                   target_temperature, uniforms, parity, allow_nan):
    """``(num_accepted, residual token, prefix term, residual term, status)`` of a fast verify
    kernel -> :class:`PoEVerifyResult`: the corrected token at the first rejection, the parity
    mean over emitted tokens, the incoming log-weights added (float64, then float32)."""
    num_accepted, residual, prefix_term, residual_term, status = raw
    _raise_status(status, ("dlm_logits", "ar_logits", None), allow_nan)
    W = draft_tokens.shape[2]
    corrected = num_accepted < W
    j = num_accepted.clamp_max(W - 1).unsqueeze(-1)
    tokens = draft_tokens.clone()
    tokens.scatter_(2, j, torch.where(corrected, residual, tokens.gather(2, j).squeeze(-1)).unsqueeze(-1))
    term = prefix_term + torch.where(corrected, residual_term, torch.zeros_like(residual_term))
    if parity:
        term = term / (num_accepted + corrected.long()).clamp_min(1).double()
    return num_accepted, tokens, (log_weights.double() + term).float(), corrected


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _draft_cpu(dlm_logits, temperatures, top_p, uniforms, allow_nan):
    return torch.ops.diffkern.poe_draft_kernel(_unit_last(dlm_logits), temperatures.float().contiguous(),
                                               top_p, uniforms.double().contiguous())


def _verify_cpu(dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
                target_temperature, uniforms, parity, allow_nan):
    return torch.ops.diffkern.poe_verify_kernel(
        _unit_last(dlm_logits), _unit_last(ar_logits), draft_tokens.contiguous(),
        temperatures.float().contiguous(), weight, top_p, target_temperature, uniforms.double().contiguous(),
        parity, allow_nan)


def _product_of_experts_cpu(logits, weights, temperature):
    return torch.ops.diffkern.product_of_experts_kernel([_unit_last(t) for t in logits], list(weights),
                                                        temperature)


_draft_op = Operator("poe_draft", device_of="dlm_logits")
_verify_op = Operator("poe_verify", device_of="dlm_logits")
_product_of_experts_op = Operator("product_of_experts", device_of="logits")

_draft_op.register("reference")(draft_reference)
_verify_op.register("reference")(verify_reference)
_product_of_experts_op.register("reference")(product_of_experts_reference)
_draft_op.register("cpu", _draft_cpu, compiled="poe_draft_kernel", dtypes={"dlm_logits": FAST_DTYPES},
                   finish=_finish_draft)
_verify_op.register("cpu", _verify_cpu, compiled="poe_verify_kernel",
                    dtypes={"dlm_logits": FAST_DTYPES, "ar_logits": FAST_DTYPES}, finish=_finish_verify)
_product_of_experts_op.register("cpu", _product_of_experts_cpu, compiled="product_of_experts_kernel",
                 dtypes={"logits": FAST_DTYPES})
_draft_op.register("triton", "diffkern.kernels.poe:poe_draft", dtypes={"dlm_logits": FAST_DTYPES},
                   finish=_finish_draft)
_verify_op.register("triton", "diffkern.kernels.poe:poe_verify",
                    dtypes={"dlm_logits": FAST_DTYPES, "ar_logits": FAST_DTYPES}, finish=_finish_verify)
_product_of_experts_op.register("triton", "diffkern.kernels.poe:product_of_experts",
                                dtypes={"logits": FAST_DTYPES})


# --------------------------------------------------------------------------------------------
# torch custom ops
# --------------------------------------------------------------------------------------------

def _stream(seed: int, offset: int, tag: int, B: int, K: int, cols: int, device) -> Tensor:
    return philox.fast_uniforms(seed, offset, tag, B * K, cols, device=device).view(B, K, cols)


@torch.library.custom_op("diffkern::poe_draft", mutates_args=())
def _poe_draft(dlm_logits: Tensor, temperatures: Tensor, top_p: float, seed: int, offset: int,
               uniforms: Optional[Tensor], allow_nan: bool) -> tuple[Tensor, Tensor]:
    B, W, V = dlm_logits.shape
    K = temperatures.shape[1]
    _check_temperatures("temperatures", temperatures)
    if uniforms is None:
        uniforms = _stream(seed, offset, TAG_DRAFT, B, K, W, dlm_logits.device)
    else:
        _check_uniforms(uniforms)
    return _draft_op(dlm_logits, temperatures, top_p, uniforms, allow_nan)


@_poe_draft.register_fake
def _(dlm_logits, temperatures, top_p, seed, offset, uniforms, allow_nan):
    B, W, _ = dlm_logits.shape
    K = temperatures.shape[1]
    return (dlm_logits.new_empty((B, K, W), dtype=torch.int64),
            dlm_logits.new_empty((B, K, W), dtype=torch.float32))


@torch.library.custom_op("diffkern::poe_verify", mutates_args=())
def _poe_verify(dlm_logits: Tensor, ar_logits: Tensor, draft_tokens: Tensor, temperatures: Tensor,
                log_weights: Tensor, weight: float, top_p: float, target_temperature: float, seed: int,
                offset: int, uniforms: Optional[Tensor], parity: bool,
                allow_nan: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    B, K, W, V = ar_logits.shape
    _check_temperatures("temperatures", temperatures)
    _check_tokens(draft_tokens, V)
    if uniforms is None:
        uniforms = torch.cat([_stream(seed, offset, TAG_ACCEPT, B, K, W, ar_logits.device),
                              _stream(seed, offset, TAG_RESIDUAL, B, K, 1, ar_logits.device)], dim=-1)
    else:
        _check_uniforms(uniforms)
    return tuple(_verify_op(dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
                            target_temperature, uniforms, parity, allow_nan))


@_poe_verify.register_fake
def _(dlm_logits, ar_logits, draft_tokens, temperatures, log_weights, weight, top_p,
      target_temperature, seed, offset, uniforms, parity, allow_nan):
    B, K, W, _ = ar_logits.shape
    return (ar_logits.new_empty((B, K), dtype=torch.int64), ar_logits.new_empty((B, K, W), dtype=torch.int64),
            ar_logits.new_empty((B, K), dtype=torch.float32), ar_logits.new_empty((B, K), dtype=torch.bool))


@torch.library.custom_op("diffkern::product_of_experts", mutates_args=())
def _product_of_experts(logits: list[Tensor], weights: list[float], temperature: float) -> Tensor:
    for i, t in enumerate(logits):
        if torch.isnan(t).any():
            raise ValueError(f"logits[{i}]: contains NaN")
    return _product_of_experts_op(logits, weights, temperature)


@_product_of_experts.register_fake
def _(logits, weights, temperature):
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in logits) else torch.float32
    return logits[0].new_empty(logits[0].shape, dtype=dtype)


def _register_kernel_fakes() -> None:
    """Fake kernels for the C++ ops, so they can be traced on their own too."""
    if _dispatch.has_compiled("poe_draft_kernel"):
        @torch.library.register_fake("diffkern::poe_draft_kernel")
        def _(logits, temps, top_p, uniforms):
            B, W, _ = logits.shape
            K = temps.shape[1]
            return (logits.new_empty((B, K, W), dtype=torch.int64),
                    logits.new_empty((B, K, W), dtype=torch.float32),
                    logits.new_empty((1, 3), dtype=torch.int64, device="cpu"))

    if _dispatch.has_compiled("poe_verify_kernel"):
        @torch.library.register_fake("diffkern::poe_verify_kernel")
        def _(dlm, ar, drafts, temps, weight, top_p, t_star, uniforms, parity, allow_nan):
            B, K, _, _ = ar.shape
            return (ar.new_empty((B, K), dtype=torch.int64), ar.new_empty((B, K), dtype=torch.int64),
                    ar.new_empty((B, K), dtype=torch.float64), ar.new_empty((B, K), dtype=torch.float64),
                    ar.new_empty((3, 3), dtype=torch.int64, device="cpu"))

    if _dispatch.has_compiled("product_of_experts_kernel"):
        @torch.library.register_fake("diffkern::product_of_experts_kernel")
        def _(logits, weights, temperature):
            return logits[0].new_empty(logits[0].shape, dtype=torch.float32)


_register_kernel_fakes()


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _resolve_seed(seed: Optional[int], offset: int, generator: Optional[torch.Generator]) -> tuple[int, int]:
    if generator is not None:
        if seed is not None:
            raise ValueError("seed/generator: pass either seed or generator, not both")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    elif seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    seed = _checks.integer("seed", seed, 0)
    offset = _checks.integer("offset", offset, 0)
    if seed >= 2 ** 63 or offset >= 2 ** 60:
        raise ValueError(f"seed/offset: expected seed < 2**63 and offset < 2**60, got {seed}, {offset}")
    return seed, offset


def _top_p(top_p) -> float:
    top_p = _checks.real_number("top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    return top_p


def _temperatures(temperatures, B: int, device) -> Tensor:
    if not isinstance(temperatures, Tensor):
        if isinstance(temperatures, (int, float)) and not isinstance(temperatures, bool):
            temperatures = [float(temperatures)]
        if not isinstance(temperatures, (list, tuple)):
            raise TypeError(f"temperatures: expected a tensor [K] or [B, K] or a sequence of floats, "
                            f"got {type(temperatures).__name__}")
        temperatures = torch.tensor([float(t) for t in temperatures], dtype=torch.float32, device=device)
    _checks.ndim("temperatures", temperatures, (1, 2), "[K] or [B, K]")
    _checks.floating("temperatures", temperatures)
    if temperatures.dim() == 2 and temperatures.shape[0] != B:
        raise ValueError(f"temperatures: expected [K] or [B={B}, K], got shape {tuple(temperatures.shape)}")
    if temperatures.shape[-1] < 1:
        raise ValueError(f"temperatures: expected K >= 1, got shape {tuple(temperatures.shape)}")
    _checks.same_device(temperatures=temperatures, dlm_logits=torch.empty(0, device=device))
    return temperatures.expand(B, temperatures.shape[-1]) if temperatures.dim() == 1 else temperatures


def _uniforms(uniforms, shape: tuple, device) -> Optional[Tensor]:
    if uniforms is None:
        return None
    _checks.tensor("uniforms", uniforms)
    _checks.floating("uniforms", uniforms)
    if tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms: expected shape {shape}, got shape {tuple(uniforms.shape)}")
    _checks.same_device(uniforms=uniforms, logits=torch.empty(0, device=device))
    return uniforms


def poe_draft(dlm_logits: Tensor, temperatures, *, top_p: float = 1.0, seed: Optional[int] = None,
              offset: int = 0, generator: Optional[torch.Generator] = None,
              uniforms: Optional[Tensor] = None, allow_nan: bool = False) -> tuple[Tensor, Tensor]:
    """Draw K particles' drafts from the tempered top-p DLM distributions, reading each row once.

    Args:
        dlm_logits: ``[B, W, V]`` float32/float16/bfloat16 (float64 on the reference backend);
            ``-inf`` entries are masked tokens. V must be the unit-stride dimension for the fast
            backends (otherwise it is copied).
        temperatures: ``[K]`` or ``[B, K]`` (mixed-temperature particles), all > 0.
        top_p: nucleus mass in (0, 1]; the nucleus is taken on the *tempered* distribution.
        seed, offset, generator: the Philox stream (see the module doc); ``seed=None`` and no
            generator draws a seed from torch's default generator.
        uniforms: ``[B, K, W]`` explicit uniforms in [0, 1) (inverse CDF in token-id order).
        allow_nan: treat NaN logits as ``-inf`` instead of raising.

    Returns:
        ``(tokens [B, K, W] int64, log_q [B, K, W] float32)`` with ``log_q = log q_{k,j}(token)``.
    """
    _checks.tensor("dlm_logits", dlm_logits)
    _checks.ndim("dlm_logits", dlm_logits, (3,), "[B, W, V]")
    _checks.floating("dlm_logits", dlm_logits)
    B, W, V = dlm_logits.shape
    if V < 1 or W < 1:
        raise ValueError(f"dlm_logits: expected W >= 1 and V >= 1, got shape {tuple(dlm_logits.shape)}")
    temps = _temperatures(temperatures, B, dlm_logits.device)
    top_p = _top_p(top_p)
    seed, offset = _resolve_seed(seed, offset, generator)
    u = _uniforms(uniforms, (B, temps.shape[1], W), dlm_logits.device)
    return torch.ops.diffkern.poe_draft(dlm_logits, temps, top_p, seed, offset, u, bool(allow_nan))


def poe_verify(dlm_logits: Tensor, ar_logits: Tensor, draft_tokens: Tensor, temperatures, *,
               weight: float, top_p: float = 1.0, target_temperature: Optional[float] = None,
               log_weights: Optional[Tensor] = None, seed: Optional[int] = None, offset: int = 0,
               generator: Optional[torch.Generator] = None, uniforms: Optional[Tensor] = None,
               parity: bool = False, allow_nan: bool = False) -> PoEVerifyResult:
    """Verify K particles' drafts against the PoE target; emit the first correction; IS weights.

    Args:
        dlm_logits: ``[B, W, V]`` shared by the K particles, or ``[B, K, W, V]`` (e.g. a stride-0
            ``expand``: read without a copy).
        ar_logits: ``[B, K, W, V]``; float32/float16/bfloat16; ``-inf`` entries are legal.
        draft_tokens: ``[B, K, W]`` integer token ids in [0, V) (from :func:`poe_draft`).
        temperatures: ``[K]`` or ``[B, K]``: the temperatures the drafts were drawn at.
        weight: w in [0, 1]: the DLM's exponent in the PoE target.
        top_p: the nucleus the drafts were drawn from (q is exactly ``poe_draft``'s proposal).
        target_temperature: T* of the AR target of the importance weights (default T_k).
        log_weights: ``[B, K]`` incoming log-weights (zeros if None).
        uniforms: ``[B, K, W + 1]`` explicit uniforms: W acceptance uniforms, then the residual one.
        parity: reproduce the official code's ratio and energy (see the module doc).
        allow_nan: treat NaN logits as ``-inf`` instead of raising.

    Returns:
        :class:`PoEVerifyResult` ``(num_accepted [B, K] int64, tokens [B, K, W] int64,
        log_weights [B, K] float32, corrected [B, K] bool)``.
    """
    _checks.tensor("ar_logits", ar_logits)
    _checks.ndim("ar_logits", ar_logits, (4,), "[B, K, W, V]")
    _checks.floating("ar_logits", ar_logits)
    B, K, W, V = ar_logits.shape
    if V < 1 or W < 1 or K < 1:
        raise ValueError(f"ar_logits: expected K, W, V >= 1, got shape {tuple(ar_logits.shape)}")
    _checks.tensor("dlm_logits", dlm_logits)
    _checks.ndim("dlm_logits", dlm_logits, (3, 4), "[B, W, V] or [B, K, W, V]")
    _checks.floating("dlm_logits", dlm_logits)
    if dlm_logits.dim() == 3:
        if tuple(dlm_logits.shape) != (B, W, V):
            raise ValueError(f"dlm_logits: expected [B={B}, W={W}, V={V}] (from ar_logits), got shape "
                             f"{tuple(dlm_logits.shape)}")
        dlm_logits = dlm_logits.unsqueeze(1).expand(B, K, W, V)
    elif tuple(dlm_logits.shape) != (B, K, W, V):
        raise ValueError(f"dlm_logits: expected [B={B}, K={K}, W={W}, V={V}] (from ar_logits), got shape "
                         f"{tuple(dlm_logits.shape)}")
    if dlm_logits.dtype != ar_logits.dtype:
        raise TypeError(f"dlm_logits: expected the dtype of ar_logits ({ar_logits.dtype}), got {dlm_logits.dtype}")
    _checks.same_device(dlm_logits=dlm_logits, ar_logits=ar_logits)
    _checks.tensor("draft_tokens", draft_tokens)
    if draft_tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"draft_tokens: expected an integer dtype, got {draft_tokens.dtype}")
    if tuple(draft_tokens.shape) != (B, K, W):
        raise ValueError(f"draft_tokens: expected [B={B}, K={K}, W={W}], got shape {tuple(draft_tokens.shape)}")
    _checks.same_device(draft_tokens=draft_tokens, ar_logits=ar_logits)
    temps = _temperatures(temperatures, B, ar_logits.device)
    if temps.shape[1] != K:
        raise ValueError(f"temperatures: expected K={K} temperatures (from ar_logits), got shape "
                         f"{tuple(temps.shape)}")
    weight = _checks.real_number("weight", weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight: expected 0 <= weight <= 1, got {weight}")
    top_p = _top_p(top_p)
    if target_temperature is None:
        t_star = 0.0
    else:
        t_star = _checks.real_number("target_temperature", target_temperature)
        if t_star <= 0:
            raise ValueError(f"target_temperature: expected > 0, got {t_star}")
    if log_weights is None:
        log_weights = torch.zeros(B, K, dtype=torch.float32, device=ar_logits.device)
    else:
        _checks.tensor("log_weights", log_weights)
        _checks.floating("log_weights", log_weights)
        if tuple(log_weights.shape) != (B, K):
            raise ValueError(f"log_weights: expected [B={B}, K={K}], got shape {tuple(log_weights.shape)}")
        _checks.same_device(log_weights=log_weights, ar_logits=ar_logits)
    seed, offset = _resolve_seed(seed, offset, generator)
    u = _uniforms(uniforms, (B, K, W + 1), ar_logits.device)
    out = torch.ops.diffkern.poe_verify(dlm_logits, ar_logits, draft_tokens.long(), temps, log_weights,
                                        weight, top_p, t_star, seed, offset, u, bool(parity), bool(allow_nan))
    return PoEVerifyResult(*out)


def product_of_experts(logits: Union[Tensor, Sequence[Tensor]], weights: Union[Tensor, Sequence[float]], *,
                       temperature: float = 1.0) -> Tensor:
    """Fused ``log_softmax(sum_i weights[i] * logits[i] / temperature)`` over the last dimension.

    Args:
        logits: a sequence of E tensors of one shape ``[..., V]``, or one ``[E, ..., V]`` tensor.
        weights: E floats (or an ``[E]`` tensor; under ``torch.compile`` pass floats), any sign:
            classifier-free guidance with scale s is ``weights = (1 + s, -s)`` on (cond, uncond).
            A weight of 0 removes its expert entirely (``0 * (-inf) = 0``); a token that is
            ``-inf`` in any expert of non-zero weight is ``-inf`` in the product (a product of
            probabilities with a zero factor), whatever the weight's sign. A row masked
            everywhere gives NaN.
        temperature: > 0.

    Returns:
        log-probabilities ``[..., V]``, float32 (float64 for float64 input).
    """
    if isinstance(logits, Tensor):
        if logits.dim() < 2:
            raise ValueError(f"logits: expected [E, ..., V] or a sequence of tensors, got shape {tuple(logits.shape)}")
        logits = list(logits.unbind(0))
    if not isinstance(logits, (list, tuple)) or not logits:
        raise TypeError("logits: expected a non-empty sequence of tensors or an [E, ..., V] tensor")
    for i, t in enumerate(logits):
        _checks.tensor(f"logits[{i}]", t)
        _checks.floating(f"logits[{i}]", t)
        if t.dim() < 1 or t.shape != logits[0].shape:
            raise ValueError(f"logits[{i}]: expected shape {tuple(logits[0].shape)} (that of logits[0]), "
                             f"got shape {tuple(t.shape)}")
    _checks.same_device(**{f"logits[{i}]": t for i, t in enumerate(logits)})
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != len(logits):
        raise ValueError(f"weights: expected {len(logits)} weights (one per expert), got {weights!r}")
    weights = [_checks.real_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
    temperature = _checks.real_number("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    return torch.ops.diffkern.product_of_experts(list(logits), weights, temperature)
