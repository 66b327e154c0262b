"""TabDiff operator family: the per-step math of TabDiff's stochastic sampler outside the network.

State of a batch of B rows (global row indices ``row_start .. row_start + B - 1``):
``x_num [B, n]`` numerical values (variance-exploding noise, per-column levels ``sigma``) and
``x_cat [B, m]`` int64 category indices, where column j has ``K_j`` classes and index ``K_j`` is
its [MASK]. The network returns ``denoised [B, n]`` (its x_0 estimate) and raw ``logits [B, L]``,
``L = sum_j (K_j + 1)``: column j owns the unpadded segment ``off_j .. off_j + K_j`` whose last
entry is the MASK logit.

Operators (step ``i`` runs from T-1 down to 0; every table is a per-column vector of that step):

* :func:`tabdiff_churn` (before the network): ``x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps`` and
  re-masking: ``x_cat_hat = MASK`` where ``u < remask_chance_j`` (the sampler's correction: values
  decoded earlier can be reopened), else ``x_cat``.
* :func:`tabdiff_step` (after the network): the EDM Euler step
  ``d = (x_hat - D) / sigma_hat``, ``x_next = x_hat + (sigma_next - sigma_hat) d``, and the
  categorical unmask sampler on each masked entry: ``log p = log_softmax`` of the segment with
  the MASK logit removed (SUBS), weights ``q_k = p_k (alpha_s - alpha_t)`` for real classes and
  ``q_MASK = 1 - alpha_s``, drawn by the exponential race ``argmax_k q_k / (-log(u_k + 1e-10) +
  1e-10)`` (ties: lowest index); entries already unmasked in ``x_cat_hat`` are copied.
* :func:`tabdiff_heun`: the second-order correction
  ``x_next = x_hat + (sigma_next - sigma_hat) (d + (x_next - D') / sigma_next) / 2``.
* :func:`tabdiff_observe` (imputation, RePaint-style): observed cells are re-drawn from the
  forward process at the next level, ``x_obs + sigma_next eps`` and ``x_cat_obs`` masked with
  probability ``mask_chance_j``, and merged with the sampled cells by per-cell ``missing`` masks.
* :func:`tabdiff_guide`: classifier-free guidance of a denoised estimate,
  ``(1 + w) cond - w uncond``. (Guided categorical logits use :func:`~diffkern.ops.product_of_experts`
  with weights ``(1 + w, -w)``, which is the same combination on log-probabilities.)

Randomness (identical on every backend)
---------------------------------------
Every random number comes from :mod:`diffkern.ops.philox` with ``offset = step`` and the global
row index as ``row``, so a table depends only on (model, seed, number of rows), never on the batch
size or on how rows are split between processes:

=================  ==========================  ====================================
operator           tag                         column
=================  ==========================  ====================================
churn noise        ``tabdiff_churn`` (normal)  numerical column i
re-mask            ``tabdiff_remask``          categorical column j
unmask race        ``tabdiff_unmask``          flat logit index ``off_j + k`` (column j, slot k)
observed noise     ``tabdiff_observed``        i (normal) / ``n + j`` (uniform)
=================  ==========================  ====================================

Explicit ``noise=`` (standard normals) and ``uniforms=`` (values in [0, 1)) replace the stream;
with them every backend returns the reference's values (categorical draws exactly).

Backends: ``reference`` (this file: float64 math, result in the input dtype; the spec), ``cpu``
(``csrc/cpu/tabdiff.cpp``: one fused pass per operator; the unmask race vectorised per row over
runs of masked segments with the branch-free exp/log of ``csrc/include/diffkern/vec_math.h``, so a
draw can differ from the reference's only where two race keys of a cell lie within an ulp) and ``triton`` (``kernels/tabdiff.py``: one
kernel per operator, the race per (row, column) over the unpadded segment); both fast backends draw
the random numbers in the loop, only for the cells that use them, and count bad values in a status
vector from which the reference's checks raise.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .._dispatch import Operator
from . import _checks, philox

__all__ = ["tabdiff_churn", "tabdiff_step", "tabdiff_heun", "tabdiff_observe", "tabdiff_guide",
           "segment_offsets"]

_TAG_CHURN = philox.TAGS["tabdiff_churn"]
_TAG_REMASK = philox.TAGS["tabdiff_remask"]
_TAG_UNMASK = philox.TAGS["tabdiff_unmask"]
_TAG_OBSERVED = philox.TAGS["tabdiff_observed"]
RACE_EPS = 1e-10   # the official sampler's guard in -log(u + eps) + eps


def segment_offsets(num_classes: Sequence[int]) -> list[int]:
    """Start of each column's logit segment (K_j + 1 wide, MASK last) in the flat layout."""
    offsets, start = [], 0
    for k in num_classes:
        offsets.append(start)
        start += int(k) + 1
    return offsets


# --------------------------------------------------------------------------------------------
# Random streams
# --------------------------------------------------------------------------------------------

def _rows(B: int, row_start: int, device) -> Tensor:
    return torch.arange(row_start, row_start + B, dtype=torch.int64, device=device).view(-1, 1)


def _cols(idx, device) -> Tensor:
    return torch.as_tensor(idx, dtype=torch.int64, device=device).view(1, -1)


# The custom ops carry the uint64 seed as the int64 with the same bits (their schema's int is
# signed); the streams read it back modulo 2**64.
def churn_noise(seed: int, step: int, row_start: int, B: int, n: int, device="cpu") -> Tensor:
    return philox.normals(seed % 2 ** 64, step, _TAG_CHURN, B, n, row_start=row_start, device=device)


# Uniforms come from the compiled Philox when it is built (the same bits: tests/test_philox.py); the
# unmask race needs B x L of them per step, a quarter of a reference sampler step in torch ops.
def remask_uniforms(seed: int, step: int, row_start: int, B: int, m: int, device="cpu") -> Tensor:
    return philox.fast_uniforms(seed % 2 ** 64, step, _TAG_REMASK, B, m, row_start=row_start, device=device)


def unmask_uniforms(seed: int, step: int, row_start: int, B: int, L: int, device="cpu") -> Tensor:
    return philox.fast_uniforms(seed % 2 ** 64, step, _TAG_UNMASK, B, L, row_start=row_start, device=device)


def observed_noise(seed: int, step: int, row_start: int, B: int, n: int, m: int, device="cpu"):
    rows, seed = _rows(B, row_start, device), seed % 2 ** 64
    return (philox.normal(seed, step, _TAG_OBSERVED, rows, _cols(range(n), device)),
            philox.uniform(seed, step, _TAG_OBSERVED, rows, _cols(range(n, n + m), device)))


# --------------------------------------------------------------------------------------------
# Value checks: the reference runs them; a fast backend counts bad cells in a status vector and
# its finish re-runs them to raise the same error (one error path for every backend)
# --------------------------------------------------------------------------------------------

def _check_unit(name: str, u: Tensor) -> None:
    if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
        raise ValueError(f"{name}: every value must lie in [0, 1)")


def _check_probability(name: str, p: Tensor) -> None:
    if p.numel() and not bool(((p >= 0) & (p <= 1)).all()):
        raise ValueError(f"{name}: every value must lie in [0, 1], got {p.flatten()[:8].tolist()}")


def _check_categories(name: str, x_cat: Tensor, num_classes: Sequence[int]) -> None:
    """Indices in [0, K_j] (K_j is the MASK)."""
    if not x_cat.numel():
        return
    k = torch.as_tensor(list(num_classes), dtype=torch.int64, device=x_cat.device)
    bad = (x_cat < 0) | (x_cat > k)
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: entry [{b}, {j}] = {int(x_cat[b, j])} is outside [0, {int(k[j])}] "
                         f"(column {j} has {int(k[j])} classes; {int(k[j])} is its MASK)")


def _check_finite(name: str, x: Tensor, hint: str = "") -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        b, j = (int(i) for i in (~torch.isfinite(x)).nonzero()[0])
        raise ValueError(f"{name}: non-finite value {float(x[b, j])} at [{b}, {j}]{hint}")


def _check_masked_logits(logits: Tensor, x_cat_hat: Tensor, num_classes: Sequence[int], step: int) -> None:
    """The segments the unmask sampler reads (masked cells): no NaN or +inf, a finite class logit."""
    for j, (start, k) in enumerate(zip(segment_offsets(num_classes), num_classes)):
        masked = x_cat_hat[:, j] == k
        if not bool(masked.any()):
            continue
        seg = logits[masked, start:start + k + 1]
        if bool(torch.isnan(seg).any()) or bool(torch.isposinf(seg).any()):
            raise ValueError(f"logits: NaN or +inf in column {j}'s logits in the network's output at step {step}")
        if bool(torch.isneginf(seg[:, :k]).all(dim=1).any()):
            raise ValueError(f"logits: every class logit of column {j} is -inf for a masked row at step {step} "
                             f"(no class can be drawn)")


def check_churn_values(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start,
                       noise, uniforms) -> None:
    _check_categories("x_cat", x_cat, num_classes)


def check_step_values(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes, alpha_t, alpha_s,
                      seed, step, row_start, uniforms) -> None:
    _check_categories("x_cat_hat", x_cat_hat, num_classes)
    _check_finite("denoised", denoised, f" (the network's output at step {step})")
    _check_masked_logits(logits, x_cat_hat, num_classes, step)


def check_heun_values(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next) -> None:
    _check_finite("denoised_next", denoised_next, " (the network's output in the Heun correction)")


def check_observe_values(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance,
                         num_classes, seed, step, row_start, noise, uniforms) -> None:
    _check_categories("x_obs_cat", x_obs_cat, num_classes)


def _finisher(check: Callable[..., None]) -> Callable:
    """A fast backend's finish: raw = (*outputs, status); any bad cell re-runs the reference check."""
    def finish(raw, *args, **kwargs):
        *outputs, status = raw
        if bool(status.any()):
            check(*args, **kwargs)
            raise AssertionError(f"internal: a fast kernel flagged {status.tolist()} but the reference check "
                                 "found nothing (please report)")
        return outputs[0] if len(outputs) == 1 else tuple(outputs)
    return finish


# --------------------------------------------------------------------------------------------
# Reference backend (float64 math; the spec)
# --------------------------------------------------------------------------------------------

def _f64(x: Tensor) -> Tensor:
    return x.to(torch.float64)


def churn_reference(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start,
                    noise, uniforms):
    check_churn_values(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start,
                       noise, uniforms)
    B, n = x_num.shape
    noise = churn_noise(seed, step, row_start, B, n, x_num.device) if noise is None else noise
    if uniforms is None:
        uniforms = remask_uniforms(seed, step, row_start, B, x_cat.shape[1], x_cat.device)
    scale = (_f64(sigma_hat) ** 2 - _f64(sigma_cur) ** 2).clamp_min(0.0).sqrt()
    x_hat = (_f64(x_num) + scale * _f64(noise)).to(x_num.dtype)
    mask_index = torch.as_tensor(list(num_classes), dtype=torch.int64, device=x_cat.device)
    remask = _f64(uniforms) < _f64(remask_chance)
    return x_hat, torch.where(remask, mask_index.expand_as(x_cat), x_cat)


def _unmask_reference(logits: Tensor, x_cat_hat: Tensor, num_classes, alpha_t: Tensor, alpha_s: Tensor,
                      uniforms: Tensor) -> Tensor:
    x_next = x_cat_hat.clone()
    for j, (start, k) in enumerate(zip(segment_offsets(num_classes), num_classes)):
        log_p = torch.log_softmax(_f64(logits[:, start:start + k]), dim=-1)          # SUBS: MASK removed
        q = torch.cat([log_p.exp() * (_f64(alpha_s[j]) - _f64(alpha_t[j])),
                       (1.0 - _f64(alpha_s[j])).expand(log_p.shape[0], 1)], dim=-1)   # [B, K_j + 1]
        race = q / (RACE_EPS - torch.log(_f64(uniforms[:, start:start + k + 1]) + RACE_EPS))
        draw = race.argmax(dim=-1)                                                    # first max on ties
        x_next[:, j] = torch.where(x_cat_hat[:, j] == k, draw, x_cat_hat[:, j])
    return x_next


def step_reference(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes,
                   alpha_t, alpha_s, seed, step, row_start, uniforms):
    check_step_values(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes, alpha_t, alpha_s,
                      seed, step, row_start, uniforms)
    if uniforms is None:
        uniforms = unmask_uniforms(seed, step, row_start, x_num_hat.shape[0], logits.shape[1], logits.device)
    d = (_f64(x_num_hat) - _f64(denoised)) / _f64(sigma_hat)
    x_next = _f64(x_num_hat) + (_f64(sigma_next) - _f64(sigma_hat)) * d
    x_cat_next = _unmask_reference(logits, x_cat_hat, num_classes, alpha_t, alpha_s, uniforms)
    return x_next.to(x_num_hat.dtype), x_cat_next, d.to(x_num_hat.dtype)


def heun_reference(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next):
    check_heun_values(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next)
    d_prime = (_f64(x_next) - _f64(denoised_next)) / _f64(sigma_next)
    out = _f64(x_num_hat) + (_f64(sigma_next) - _f64(sigma_hat)) * (0.5 * _f64(d) + 0.5 * d_prime)
    return out.to(x_num_hat.dtype)


def observe_reference(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next,
                      mask_chance, num_classes, seed, step, row_start, noise, uniforms):
    check_observe_values(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance,
                         num_classes, seed, step, row_start, noise, uniforms)
    if noise is None or uniforms is None:
        B, n = z_num.shape
        drawn_noise, drawn_uniforms = observed_noise(seed, step, row_start, B, n, z_cat.shape[1], z_num.device)
        noise = drawn_noise if noise is None else noise
        uniforms = drawn_uniforms if uniforms is None else uniforms
    known_num = (_f64(x_obs_num) + _f64(sigma_next) * _f64(noise)).to(z_num.dtype)
    mask_index = torch.as_tensor(list(num_classes), dtype=torch.int64, device=z_cat.device)
    known_cat = torch.where(_f64(uniforms) < _f64(mask_chance), mask_index.expand_as(x_obs_cat), x_obs_cat)
    return torch.where(num_missing, z_num, known_num), torch.where(cat_missing, z_cat, known_cat)


def guide_reference(cond, uncond, weight):
    return ((1.0 + weight) * _f64(cond) - weight * _f64(uncond)).to(cond.dtype)


# --------------------------------------------------------------------------------------------
# cpu backend (csrc/cpu/tabdiff.cpp): random numbers drawn in the loop, only where used
# --------------------------------------------------------------------------------------------

def _table(x: Tensor) -> Tensor:
    return x.to(torch.float64).contiguous()


def _grid(x: Optional[Tensor]) -> Optional[Tensor]:
    return None if x is None else x.to(torch.float64).contiguous()


def _unit_columns(x: Tensor) -> Tensor:
    return x if x.shape[1] <= 1 or x.stride(1) == 1 else x.contiguous()


def _churn_cpu(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start, noise,
               uniforms):
    return torch.ops.diffkern.tabdiff_churn_kernel(
        _unit_columns(x_num), _unit_columns(x_cat), _table(sigma_cur), _table(sigma_hat), _table(remask_chance),
        num_classes, seed, step, row_start, _grid(noise), _grid(uniforms))


def _step_cpu(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes, alpha_t, alpha_s,
              seed, step, row_start, uniforms):
    return torch.ops.diffkern.tabdiff_step_kernel(
        _unit_columns(x_num_hat), _unit_columns(x_cat_hat), _unit_columns(denoised), _unit_columns(logits),
        _table(sigma_hat), _table(sigma_next), num_classes, _table(alpha_t), _table(alpha_s), seed, step,
        row_start, _grid(uniforms))


def _heun_cpu(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next):
    return torch.ops.diffkern.tabdiff_heun_kernel(
        *(_unit_columns(t) for t in (x_num_hat, x_next, denoised_next, d)), _table(sigma_hat), _table(sigma_next))


def _observe_cpu(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance,
                 num_classes, seed, step, row_start, noise, uniforms):
    return torch.ops.diffkern.tabdiff_observe_kernel(
        *(_unit_columns(t) for t in (z_num, z_cat, x_obs_num, x_obs_cat)), num_missing, cat_missing,
        _table(sigma_next), _table(mask_chance), num_classes, seed, step, row_start, _grid(noise),
        _grid(uniforms))


def _one_float_dtype(*pairs: tuple[int, str]) -> Callable[..., list[str]]:
    """A need no dtype declaration expresses: the kernels read these arguments (positions in the
    reference's signature) with the element type of the first one."""
    def check(*args, **kwargs) -> list[str]:
        (i0, first), *rest = pairs
        return [f"{name} is {args[i].dtype} but {first} is {args[i0].dtype} (the kernel reads both as one type)"
                for i, name in rest if args[i].dtype != args[i0].dtype]
    return check


def _device_of_first(*args, **kwargs) -> torch.device:
    return args[0].device


NUM_DTYPES = (torch.float32, torch.float64)   # the state's dtypes the compiled kernels take
_churn_op = Operator("tabdiff_churn", _device_of_first)
_step_op = Operator("tabdiff_step", _device_of_first)
_heun_op = Operator("tabdiff_heun", _device_of_first)
_observe_op = Operator("tabdiff_observe", _device_of_first)
_guide_op = Operator("tabdiff_guide", _device_of_first)
_churn_op.register("reference")(churn_reference)
_step_op.register("reference")(step_reference)
_heun_op.register("reference")(heun_reference)
_observe_op.register("reference")(observe_reference)
_guide_op.register("reference")(guide_reference)
_churn_op.register("cpu", _churn_cpu, compiled="tabdiff_churn_kernel", dtypes={"x_num": NUM_DTYPES},
                   finish=_finisher(check_churn_values))
_step_op.register("cpu", _step_cpu, compiled="tabdiff_step_kernel",
                  dtypes={"x_num_hat": NUM_DTYPES, "logits": _checks.FLOAT_DTYPES},
                  check=_one_float_dtype((0, "x_num_hat"), (2, "denoised")), finish=_finisher(check_step_values))
_heun_op.register("cpu", _heun_cpu, compiled="tabdiff_heun_kernel", dtypes={"x_num_hat": NUM_DTYPES},
                  check=_one_float_dtype((0, "x_num_hat"), (1, "x_next"), (2, "denoised_next"), (3, "d")),
                  finish=_finisher(check_heun_values))
_observe_op.register("cpu", _observe_cpu, compiled="tabdiff_observe_kernel", dtypes={"z_num": NUM_DTYPES},
                     check=_one_float_dtype((0, "z_num"), (2, "x_obs_num")), finish=_finisher(check_observe_values))
# triton (kernels/tabdiff.py): every input is read in its own dtype, so no single-dtype check
_churn_op.register("triton", "diffkern.kernels.tabdiff:tabdiff_churn", dtypes={"x_num": NUM_DTYPES},
                   finish=_finisher(check_churn_values))
_step_op.register("triton", "diffkern.kernels.tabdiff:tabdiff_step",
                  dtypes={"x_num_hat": NUM_DTYPES, "logits": _checks.FLOAT_DTYPES},
                  finish=_finisher(check_step_values))
_heun_op.register("triton", "diffkern.kernels.tabdiff:tabdiff_heun", dtypes={"x_num_hat": NUM_DTYPES},
                  finish=_finisher(check_heun_values))
_observe_op.register("triton", "diffkern.kernels.tabdiff:tabdiff_observe", dtypes={"z_num": NUM_DTYPES},
                     finish=_finisher(check_observe_values))


# --------------------------------------------------------------------------------------------
# torch custom ops (checks of the per-column tables and of explicit random numbers; the state's
# value checks run inside the backends, above)
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("diffkern::tabdiff_churn", mutates_args=())
def _tabdiff_churn(x_num: Tensor, x_cat: Tensor, sigma_cur: Tensor, sigma_hat: Tensor,
                   remask_chance: Tensor, num_classes: list[int], seed: int, step: int, row_start: int,
                   noise: Optional[Tensor], uniforms: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check_probability("remask_chance", remask_chance)
    if bool((sigma_hat < sigma_cur).any()):
        raise ValueError("sigma_hat: every level must be >= sigma_cur (churn only adds noise)")
    if uniforms is not None:
        _check_unit("uniforms", uniforms)
    return _churn_op(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start,
                     noise, uniforms)


@_tabdiff_churn.register_fake
def _(x_num, x_cat, sigma_cur, sigma_hat, remask_chance, num_classes, seed, step, row_start, noise, uniforms):
    return torch.empty_like(x_num), torch.empty_like(x_cat)


@torch.library.custom_op("diffkern::tabdiff_step", mutates_args=())
def _tabdiff_step(x_num_hat: Tensor, x_cat_hat: Tensor, denoised: Tensor, logits: Tensor,
                  sigma_hat: Tensor, sigma_next: Tensor, num_classes: list[int], alpha_t: Tensor,
                  alpha_s: Tensor, seed: int, step: int, row_start: int,
                  uniforms: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    _check_probability("alpha_t", alpha_t)
    _check_probability("alpha_s", alpha_s)
    if bool((alpha_s < alpha_t).any()):
        raise ValueError("alpha_s/alpha_t: the next step must be less masked (alpha_s >= alpha_t)")
    if uniforms is not None:
        _check_unit("uniforms", uniforms)
    return _step_op(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes,
                    alpha_t, alpha_s, seed, step, row_start, uniforms)


@_tabdiff_step.register_fake
def _(x_num_hat, x_cat_hat, denoised, logits, sigma_hat, sigma_next, num_classes, alpha_t, alpha_s,
      seed, step, row_start, uniforms):
    return torch.empty_like(x_num_hat), torch.empty_like(x_cat_hat), torch.empty_like(x_num_hat)


@torch.library.custom_op("diffkern::tabdiff_heun", mutates_args=())
def _tabdiff_heun(x_num_hat: Tensor, x_next: Tensor, denoised_next: Tensor, d: Tensor,
                  sigma_hat: Tensor, sigma_next: Tensor) -> Tensor:
    if bool((sigma_next <= 0).any()):
        raise ValueError("sigma_next: the Heun correction needs sigma_next > 0 (skip it at the last step)")
    return _heun_op(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next)


@_tabdiff_heun.register_fake
def _(x_num_hat, x_next, denoised_next, d, sigma_hat, sigma_next):
    return torch.empty_like(x_num_hat)


@torch.library.custom_op("diffkern::tabdiff_observe", mutates_args=())
def _tabdiff_observe(z_num: Tensor, z_cat: Tensor, x_obs_num: Tensor, x_obs_cat: Tensor,
                     num_missing: Tensor, cat_missing: Tensor, sigma_next: Tensor, mask_chance: Tensor,
                     num_classes: list[int], seed: int, step: int, row_start: int,
                     noise: Optional[Tensor], uniforms: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    _check_probability("mask_chance", mask_chance)
    if uniforms is not None:
        _check_unit("uniforms", uniforms)
    return _observe_op(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next,
                       mask_chance, num_classes, seed, step, row_start, noise, uniforms)


@_tabdiff_observe.register_fake
def _(z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, sigma_next, mask_chance, num_classes,
      seed, step, row_start, noise, uniforms):
    return torch.empty_like(z_num), torch.empty_like(z_cat)


@torch.library.custom_op("diffkern::tabdiff_guide", mutates_args=())
def _tabdiff_guide(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
    return _guide_op(cond, uncond, weight)


@_tabdiff_guide.register_fake
def _(cond, uncond, weight):
    return torch.empty_like(cond)


# --------------------------------------------------------------------------------------------
# Public API (argument checks name the argument; then the custom op)
# --------------------------------------------------------------------------------------------

def _state(name: str, x: Tensor, B: Optional[int] = None, width: Optional[int] = None, integer=False) -> Tensor:
    _checks.tensor(name, x)
    _checks.ndim(name, x, (2,), "[B, columns]")
    if integer:
        if x.dtype != torch.int64:
            raise TypeError(f"{name}: expected int64 category indices, got {x.dtype}")
    else:
        _checks.floating(name, x)
    if B is not None and x.shape[0] != B:
        raise ValueError(f"{name}: expected {B} rows (from x_num), got shape {tuple(x.shape)}")
    if width is not None and x.shape[1] != width:
        raise ValueError(f"{name}: expected {width} columns, got shape {tuple(x.shape)}")
    return x


def _per_column(name: str, x, width: int, device) -> Tensor:
    x = torch.as_tensor(x, dtype=torch.float64, device=device) if not isinstance(x, Tensor) else x
    _checks.floating(name, x)
    if x.dim() != 1 or x.shape[0] != width:
        raise ValueError(f"{name}: expected one value per column, shape [{width}], got shape {tuple(x.shape)}")
    return x.to(device)


def _classes(num_classes, m: int) -> list[int]:
    if isinstance(num_classes, Tensor):
        num_classes = num_classes.tolist()
    num_classes = [int(k) for k in num_classes]
    if len(num_classes) != m or any(k < 1 for k in num_classes):
        raise ValueError(f"num_classes: expected {m} class counts >= 1 (one per categorical column), "
                         f"got {num_classes}")
    return num_classes


def _key(seed: int, step: int, row_start: int) -> tuple[int, int, int]:
    seed = _checks.integer("seed", seed, 0)
    if seed >= 2 ** 64:
        raise ValueError(f"seed: expected < 2**64, got {seed}")
    step = _checks.integer("step", step, 0)
    if step >= philox.MAX_OFFSET:
        raise ValueError(f"step: expected < 2**60, got {step}")
    row_start = _checks.integer("row_start", row_start, 0)
    return _signed(seed), step, row_start


def _signed(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (what the custom ops' schema can carry)."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _explicit(name: str, x: Optional[Tensor], shape: tuple, device) -> Optional[Tensor]:
    if x is None:
        return None
    _checks.tensor(name, x)
    _checks.floating(name, x)
    if tuple(x.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got shape {tuple(x.shape)}")
    _checks.same_device(**{name: x, "state": torch.empty(0, device=device)})
    return x


def tabdiff_churn(x_num: Tensor, x_cat: Tensor, sigma_cur, sigma_hat, remask_chance, num_classes, *,
                  seed: int, step: int, row_start: int = 0, noise: Optional[Tensor] = None,
                  uniforms: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The stochastic sampler's churn before the network call of step ``step``.

    Args:
        x_num: ``[B, n]`` numerical state at level ``sigma_cur``; x_cat: ``[B, m]`` int64 indices
            (``num_classes[j]`` is column j's MASK).
        sigma_cur, sigma_hat: ``[n]`` noise levels per column, ``sigma_hat >= sigma_cur``.
        remask_chance: ``[m]`` probability that an entry is (re-)masked, ``1 - exp(sc - sc_hat)``.
        seed, step, row_start: the Philox key (``row_start`` = global index of row 0).
        noise: ``[B, n]`` explicit standard normals; uniforms: ``[B, m]`` explicit uniforms.

    Returns:
        ``(x_num_hat [B, n], x_cat_hat [B, m])``.
    """
    x_num = _state("x_num", x_num)
    B, n = x_num.shape
    x_cat = _state("x_cat", x_cat, B, integer=True)
    m = x_cat.shape[1]
    dev = x_num.device
    _checks.same_device(x_num=x_num, x_cat=x_cat)
    seed, step, row_start = _key(seed, step, row_start)
    return torch.ops.diffkern.tabdiff_churn(
        x_num, x_cat, _per_column("sigma_cur", sigma_cur, n, dev), _per_column("sigma_hat", sigma_hat, n, dev),
        _per_column("remask_chance", remask_chance, m, dev), _classes(num_classes, m), seed, step, row_start,
        _explicit("noise", noise, (B, n), dev), _explicit("uniforms", uniforms, (B, m), dev))


def tabdiff_step(x_num_hat: Tensor, x_cat_hat: Tensor, denoised: Tensor, logits: Tensor, sigma_hat, sigma_next,
                 num_classes, alpha_t, alpha_s, *, seed: int, step: int, row_start: int = 0,
                 uniforms: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """The step after the network call: EDM Euler update and the categorical unmask sampler.

    Args:
        x_num_hat, x_cat_hat: the churned state ``[B, n]``, ``[B, m]`` (from :func:`tabdiff_churn`).
        denoised: ``[B, n]`` the network's x_0 estimate; logits: ``[B, L]`` raw logits,
            ``L = sum_j (num_classes[j] + 1)`` (per column: K_j classes, then MASK).
        sigma_hat, sigma_next: ``[n]``; alpha_t, alpha_s: ``[m]`` the unmasked fractions
            ``exp(-sigma_cat)`` at the current (churned) and the next level.
        uniforms: ``[B, L]`` explicit race uniforms (one per logit slot).

    Returns:
        ``(x_num_next [B, n], x_cat_next [B, m], d [B, n])``; ``d`` feeds :func:`tabdiff_heun`.
    """
    x_num_hat = _state("x_num_hat", x_num_hat)
    B, n = x_num_hat.shape
    x_cat_hat = _state("x_cat_hat", x_cat_hat, B, integer=True)
    m = x_cat_hat.shape[1]
    num_classes = _classes(num_classes, m)
    L = sum(num_classes) + m
    denoised = _state("denoised", denoised, B, n)
    logits = _state("logits", logits, B, L)
    dev = x_num_hat.device
    _checks.same_device(x_num_hat=x_num_hat, x_cat_hat=x_cat_hat, denoised=denoised, logits=logits)
    seed, step, row_start = _key(seed, step, row_start)
    return torch.ops.diffkern.tabdiff_step(
        x_num_hat, x_cat_hat, denoised, logits, _per_column("sigma_hat", sigma_hat, n, dev),
        _per_column("sigma_next", sigma_next, n, dev), num_classes, _per_column("alpha_t", alpha_t, m, dev),
        _per_column("alpha_s", alpha_s, m, dev), seed, step, row_start, _explicit("uniforms", uniforms, (B, L), dev))


def tabdiff_heun(x_num_hat: Tensor, x_next: Tensor, denoised_next: Tensor, d: Tensor, sigma_hat,
                 sigma_next) -> Tensor:
    """Heun's correction of the Euler step (``denoised_next``: the network at ``x_next``, ``sigma_next``)."""
    x_num_hat = _state("x_num_hat", x_num_hat)
    B, n = x_num_hat.shape
    x_next, denoised_next, d = (_state(name, t, B, n) for name, t in
                                (("x_next", x_next), ("denoised_next", denoised_next), ("d", d)))
    dev = x_num_hat.device
    _checks.same_device(x_num_hat=x_num_hat, x_next=x_next, denoised_next=denoised_next, d=d)
    return torch.ops.diffkern.tabdiff_heun(x_num_hat, x_next, denoised_next, d,
                                           _per_column("sigma_hat", sigma_hat, n, dev),
                                           _per_column("sigma_next", sigma_next, n, dev))


def tabdiff_observe(z_num: Tensor, z_cat: Tensor, x_obs_num: Tensor, x_obs_cat: Tensor, num_missing: Tensor,
                    cat_missing: Tensor, sigma_next, mask_chance, num_classes, *, seed: int, step: int,
                    row_start: int = 0, noise: Optional[Tensor] = None,
                    uniforms: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Imputation merge: observed cells re-drawn at the next level, missing cells from the sampler.

    Args:
        z_num, z_cat: the sampler's state after the step ``[B, n]``, ``[B, m]``.
        x_obs_num, x_obs_cat: the observed values (anything in the missing cells).
        num_missing, cat_missing: ``[B, n]``, ``[B, m]`` bool, True where the cell is sampled.
        sigma_next: ``[n]``; mask_chance: ``[m]`` masking probability of an observed category at the
            next level (1 at the first step, so observed categories enter fully masked).
        noise: ``[B, n]`` explicit normals; uniforms: ``[B, m]`` explicit uniforms.
    """
    z_num = _state("z_num", z_num)
    B, n = z_num.shape
    z_cat = _state("z_cat", z_cat, B, integer=True)
    m = z_cat.shape[1]
    x_obs_num = _state("x_obs_num", x_obs_num, B, n)
    x_obs_cat = _state("x_obs_cat", x_obs_cat, B, m, integer=True)
    for name, mask, width in (("num_missing", num_missing, n), ("cat_missing", cat_missing, m)):
        _checks.tensor(name, mask)
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, width):
            raise ValueError(f"{name}: expected a bool mask of shape ({B}, {width}), got "
                             f"{mask.dtype} of shape {tuple(mask.shape)}")
    dev = z_num.device
    _checks.same_device(z_num=z_num, z_cat=z_cat, x_obs_num=x_obs_num, x_obs_cat=x_obs_cat,
                        num_missing=num_missing, cat_missing=cat_missing)
    seed, step, row_start = _key(seed, step, row_start)
    return torch.ops.diffkern.tabdiff_observe(
        z_num, z_cat, x_obs_num, x_obs_cat, num_missing, cat_missing, _per_column("sigma_next", sigma_next, n, dev),
        _per_column("mask_chance", mask_chance, m, dev), _classes(num_classes, m), seed, step, row_start,
        _explicit("noise", noise, (B, n), dev), _explicit("uniforms", uniforms, (B, m), dev))


def tabdiff_guide(cond: Tensor, uncond: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance of a denoised estimate: ``(1 + weight) cond - weight uncond``."""
    _checks.tensor("cond", cond)
    _checks.tensor("uncond", uncond)
    _checks.floating("cond", cond)
    _checks.floating("uncond", uncond)
    if cond.shape != uncond.shape:
        raise ValueError(f"uncond: expected shape {tuple(cond.shape)} (that of cond), got {tuple(uncond.shape)}")
    _checks.same_device(cond=cond, uncond=uncond)
    return torch.ops.diffkern.tabdiff_guide(cond, uncond.to(cond.dtype), _checks.real_number("weight", weight))
