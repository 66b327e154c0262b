"""TabDiff's forward processes, learnable per-column schedules and training loss.

Numerical column i (variance exploding): ``x_t = x_0 + sigma_i(t) eps`` with the power-mean
schedule ``sigma_i(t) = (s_min^(1/rho_i) + t (s_max^(1/rho_i) - s_min^(1/rho_i)))^rho_i``,
``rho_i = softplus(rho_raw_i) + rho_offset`` (learnable; rho ~ 12 at init).

Categorical column j (masking): masked with probability
``m_j(t) = eps_min + (1 - eps_max - eps_min) t^k_j``, ``k_j = softplus(k_raw_j) + k_offset``
(learnable; k ~ 1.0025 at init). In the official notation ``sigma_j = -log1p(-m_j)``,
``alpha_j = exp(-sigma_j)`` and the rate ``sigma'_j``.

Loss (one ``t ~ U(0, 1)`` per row, shared by its columns): the EDM-weighted numerical error
``lambda(sigma) (D - x_0)^2`` with ``lambda = (sigma^2 + sd^2) / (sigma sd)^2`` and the masked
diffusion ELBO ``-sigma' / expm1(sigma) * log p(x_0 | x_t)`` over masked entries (SUBS: the MASK
logit is removed, unmasked entries are certain). Training corrupts categories with a
straight-through 2-way gumbel-softmax (tau = 0.01), so gradients reach ``k`` through the input.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.tabdiff import segment_offsets
from .network import Denoiser


def _per_column_parameter(module: nn.Module, width: int, init: float, fixed: Optional[Sequence[float]]) -> nn.Parameter:
    """The raw learnable per-column parameter; with ``fixed`` values it is frozen and ``module.fixed``
    (a buffer, saved with the model) holds the values used instead."""
    raw = nn.Parameter(torch.full((width,), float(init)), requires_grad=fixed is None)
    if fixed is not None:
        module.register_buffer("fixed", torch.as_tensor(list(fixed), dtype=torch.float32))
    else:
        module.fixed = None
    return raw


def _softplus_or_fixed(raw: Tensor, fixed: Optional[Tensor], offset: float) -> Tensor:
    return fixed if fixed is not None else F.softplus(raw) + offset


class PowerMeanSchedule(nn.Module):
    """Per-column power-mean noise ``sigma_i(t)``; ``rho`` learnable unless ``fixed_rho`` is given."""

    def __init__(self, n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho_init: float = 7.0,
                 rho_offset: float = 5.0, fixed_rho: Optional[Sequence[float]] = None):
        super().__init__()
        self.sigma_min, self.sigma_max, self.rho_offset = sigma_min, sigma_max, rho_offset
        self.rho_raw = _per_column_parameter(self, n, rho_init, fixed_rho)

    def rho(self) -> Tensor:
        return _softplus_or_fixed(self.rho_raw, self.fixed, self.rho_offset)

    def _ends(self, rho: Tensor) -> tuple[Tensor, Tensor]:
        return self.sigma_min ** (1 / rho), self.sigma_max ** (1 / rho)

    def total_noise(self, t: Tensor) -> Tensor:
        """``[..., n]`` levels at ``t [..., 1]``."""
        rho = self.rho().to(t.dtype)
        lo, hi = self._ends(rho)
        return (lo + t * (hi - lo)).pow(rho)

    def inverse_to_t(self, sigma: Tensor) -> Tensor:
        rho = self.rho().to(sigma.dtype)
        lo, hi = self._ends(rho)
        return (sigma.pow(1 / rho) - lo) / (hi - lo)


class MaskingSchedule(nn.Module):
    """Per-column masking ``m_j(t) = eps_min + (1 - eps_max - eps_min) t^k_j``; ``k`` learnable unless
    ``fixed_k`` is given (the official non-learnable schedule is k = 1)."""

    def __init__(self, m: int, eps_max: float = 1e-3, eps_min: float = 1e-5, k_init: float = -6.0,
                 k_offset: float = 1.0, fixed_k: Optional[Sequence[float]] = None):
        super().__init__()
        self.eps_max, self.eps_min, self.k_offset = eps_max, eps_min, k_offset
        self.k_raw = _per_column_parameter(self, m, k_init, fixed_k)

    def k(self) -> Tensor:
        return _softplus_or_fixed(self.k_raw, self.fixed, self.k_offset)

    def total_noise(self, t: Tensor) -> Tensor:
        """``sigma_j(t) = -log1p(-m_j(t))``, ``[..., m]`` at ``t [..., 1]``."""
        k = self.k().to(t.dtype)
        return -torch.log1p(-((1 - self.eps_max - self.eps_min) * t.pow(k) + self.eps_min))

    def rate_noise(self, t: Tensor) -> Tensor:
        k = self.k().to(t.dtype)
        scale = 1 - self.eps_max - self.eps_min
        return scale * k * t.pow(k - 1) / (1 - (scale * t.pow(k) + self.eps_min))


def soft_corrupt(x_cat: Tensor, move_chance: Tensor, num_classes: Sequence[int],
                 generator: Optional[torch.Generator], gumbel: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Mask each entry with probability ``move_chance [B, m]`` by a straight-through 2-way
    gumbel-softmax (tau = 0.01), so gradients reach the schedule. Returns ``(x_t [B, m] int64,
    one-hot [B, L] float)`` with the sample's two values written into the (x_0, MASK) slots.
    ``gumbel [B, m, 2]`` (standard Gumbel draws) is drawn from ``generator`` when not given."""
    B, m = x_cat.shape
    if m == 0:                                          # an all-numerical table
        return x_cat, move_chance.new_zeros(B, 0)
    logp = torch.stack([torch.log1p(-move_chance), torch.log(move_chance)], dim=-1)      # [B, m, 2]
    if gumbel is None:
        gumbel = -torch.empty_like(logp).exponential_(generator=generator).log()
    soft = torch.softmax((logp + gumbel) / 0.01, dim=-1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    sample = hard - soft.detach() + soft                                                   # straight-through
    offsets = torch.tensor(segment_offsets(num_classes), device=x_cat.device)
    mask_slot = offsets + torch.tensor(list(num_classes), device=x_cat.device)
    onehot = sample.new_zeros(B, int(mask_slot[-1]) + 1 if m else 0)
    rows = torch.arange(B, device=x_cat.device)[:, None].expand(B, m)
    onehot = onehot.index_put((rows, x_cat + offsets), sample[..., 0])
    onehot = onehot.index_put((rows, mask_slot.expand(B, m)), sample[..., 1], accumulate=True)
    x_t = torch.where(hard[..., 1] > 0, torch.tensor(list(num_classes), device=x_cat.device).expand(B, m), x_cat)
    return x_t, onehot


def subs_log_prob(logits: Tensor, num_classes: Sequence[int], target: Tensor) -> Tensor:
    """``log p(target_j)`` ``[B, m]`` under the SUBS distribution of each column's segment (the MASK
    logit removed; the caller zeroes unmasked entries, which SUBS makes certain)."""
    out = []
    for j, (start, k) in enumerate(zip(segment_offsets(num_classes), num_classes)):
        log_p = torch.log_softmax(logits[:, start:start + k], dim=-1)
        out.append(log_p.gather(-1, target[:, j:j + 1]))
    return torch.cat(out, dim=-1) if out else logits.new_zeros(logits.shape[0], 0)


@dataclasses.dataclass
class TrainingNoise:
    """The random draws of one training batch, one row per data row: ``t [B, 1]`` uniform,
    ``eps [B, n]`` standard normal, ``gumbel [B, m, 2]`` standard Gumbel (None without categories).
    Drawn once for a whole global batch, a process training on rows ``a..b`` of it takes
    :meth:`rows`, so the draws of a row do not depend on how many processes share the batch."""
    t: Tensor
    eps: Tensor
    gumbel: Optional[Tensor]

    def rows(self, start: int, stop: int) -> "TrainingNoise":
        return TrainingNoise(self.t[start:stop], self.eps[start:stop],
                             None if self.gumbel is None else self.gumbel[start:stop])


def _batch_mean(values: Tensor, total_rows: Optional[int]) -> Tensor:
    """The mean over ``values [B, k]``, or with ``total_rows`` this shard's share of the mean over a
    global batch of that many rows (the shares of all shards add up to the global mean)."""
    return values.mean() if total_rows is None else values.sum() / (total_rows * values.shape[1])


class TabDiffModel(nn.Module):
    """Denoiser + the two per-column schedules; ``loss`` is the official mixed loss."""

    def __init__(self, n_num: int, num_classes: Sequence[int], network: dict, schedule: dict,
                 fixed_rho: Optional[Sequence[float]] = None, fixed_k: Optional[Sequence[float]] = None):
        """``fixed_rho``/``fixed_k`` (one value per column) freeze a schedule; None: learnable."""
        super().__init__()
        self.n_num, self.num_classes = n_num, [int(k) for k in num_classes]
        self.network = Denoiser(n_num, self.num_classes, **network)
        num_keys = ("sigma_min", "sigma_max", "rho_init", "rho_offset")
        cat_keys = ("eps_max", "eps_min", "k_init", "k_offset")
        self.num_schedule = PowerMeanSchedule(n_num, **{k: schedule[k] for k in num_keys}, fixed_rho=fixed_rho)
        self.cat_schedule = MaskingSchedule(len(self.num_classes), **{k: schedule[k] for k in cat_keys},
                                            fixed_k=fixed_k)

    def draw_noise(self, rows: int, generator: Optional[torch.Generator] = None,
                   device: Optional[torch.device] = None) -> TrainingNoise:
        """The random draws of a training batch of ``rows`` rows, in the order ``loss`` always drew them."""
        t = torch.rand(rows, 1, generator=generator, device=device)
        eps = torch.randn((rows, self.n_num), generator=generator, device=device)
        gumbel = None
        if self.num_classes:
            gumbel = -torch.empty(rows, len(self.num_classes), 2, device=device).exponential_(generator=generator).log()
        return TrainingNoise(t, eps, gumbel)

    def loss(self, x_num: Tensor, x_cat: Tensor, generator: Optional[torch.Generator] = None,
             noise: Optional[TrainingNoise] = None, total_rows: Optional[int] = None):
        """``(categorical loss, numerical loss)``, each a mean over the batch's entries.

        ``noise`` gives the batch's random draws (default: drawn from ``generator``). With
        ``total_rows`` the batch is a shard of a global batch of that many rows and each loss is
        this shard's share of the global mean (a shard may then be empty)."""
        if noise is None:
            noise = self.draw_noise(x_num.shape[0], generator, x_num.device)
        t = noise.t
        sigma_num = self.num_schedule.total_noise(t)
        sigma_cat = self.cat_schedule.total_noise(t)
        x_num_t = x_num + noise.eps * sigma_num
        x_cat_t, onehot = soft_corrupt(x_cat, -torch.expm1(-sigma_cat), self.num_classes, None, noise.gumbel)
        denoised, logits = self.network(x_num_t, onehot, t.squeeze(1), sigma_num)
        c_loss = d_loss = x_num.new_zeros(())
        if self.n_num:
            sd2 = self.network.sigma_data ** 2
            weight = (sigma_num ** 2 + sd2) / (sigma_num ** 2 * sd2)
            c_loss = _batch_mean(weight * (denoised - x_num) ** 2, total_rows)
        if self.num_classes:
            mask = torch.tensor(self.num_classes, device=x_cat.device)
            log_p = subs_log_prob(logits, self.num_classes, x_cat) * (x_cat_t == mask)
            elbo_weight = -self.cat_schedule.rate_noise(t) / torch.expm1(sigma_cat)
            d_loss = _batch_mean(elbo_weight * log_p, total_rows)
        return d_loss, c_loss
