"""TabDiff's stochastic sampler (churn, re-masking, Euler + Heun) and RePaint-style imputation.

Tensors only: ``x_num [N, n]`` in the model's (quantile-normal) space, ``x_cat [N, m]`` indices.
All per-step math outside the network runs through the ``diffkern.ops.tabdiff_*`` operators, so
swapping kernels is backend selection. Randomness is keyed by (seed, step, global row, column),
so the random numbers depend only on (model, seed, number of rows), not on ``batch_size``: categories
are batch-size invariant, numerical values only to float rounding (CPU GEMM and vectorised
activations round a row differently in batches of different shapes; up to ~5e-6 measured).

The loop of one batch, per step i = T-1 .. 0 (official ``UnifiedCtimeDiffusion.edm_update``)::

    churn      x_hat = x + sqrt(s_hat^2 - s^2) eps;  re-mask categories      tabdiff_churn
    network    D, logits at (x_hat, x_cat_hat, t_hat)                       (+ guidance)
    step       Euler update; unmask masked categories                         tabdiff_step
    heun       second network call at (x_next, x_cat_hat, t_{i-1})           tabdiff_heun   (i > 0)
    observe    observed cells re-drawn at s_next and merged                  tabdiff_observe (imputation)

With ``forecast=`` (a Spectrum, TaylorSeer or FORA config) the network calls of the steps its
schedule skips forecast the trunk's output instead of running it (see ``forecasting``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import ops
from ..ops.tabdiff import segment_offsets
from .diffusion import TabDiffModel
from .forecasting import ForecastConfig, TrunkForecast, check_forecast

PRIOR_OFFSET = 1 << 40     # Philox offset of the initial noise (steps use offsets 0 .. T-1)


@dataclasses.dataclass
class SamplerTables:
    """Per-step, per-column levels of one ``sample()`` call (fixed while rho and k are)."""
    t: Tensor             # [T] time grid linspace(0, 1, T)
    t_hat: Tensor         # [T] churned time: min over numerical columns of inverse(sigma_hat)
    sigma: Tensor         # [T, n] numerical levels
    sigma_hat: Tensor     # [T, n] churned levels (1 + gamma) sigma
    sigma_next: Tensor    # [T, n] sigma[i - 1], 0 at i = 0
    remask: Tensor        # [T, m] re-mask chance 1 - exp(sc - sc_hat)
    alpha_t: Tensor       # [T, m] exp(-sc_hat)
    alpha_s: Tensor       # [T, m] exp(-sc_next)
    observe_mask: Tensor  # [T, m] masking chance of observed categories at the next level (1 at i = T-1)


@torch.no_grad()
def sampler_tables(model: TabDiffModel, steps: int, stochastic: bool = True, churn: float = 1.0) -> SamplerTables:
    """The official tables (``UnifiedCtimeDiffusion.sample``), computed in float64."""
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    sched_num, sched_cat = model.num_schedule.double(), model.cat_schedule.double()
    try:
        sigma, sc = sched_num.total_noise(t), sched_cat.total_noise(t)
        shift = lambda x: torch.cat([torch.zeros_like(x[:1]), x[:-1]])   # noqa: E731  (next = previous index)
        sigma_next, sc_next = shift(sigma), shift(sc)
        t_hat, sigma_hat = t.clone(), sigma.clone()
        if stochastic and model.n_num:
            gamma = min(churn / steps, math.sqrt(2) - 1)
            sigma_hat = sigma * (1 + gamma)
            t_hat = sched_num.inverse_to_t(sigma_hat).min(dim=-1, keepdim=True).values
            out = (t_hat > 1).squeeze(1)           # only at t = 1: keep the level, no churn
            sigma_hat[out], t_hat[out] = sigma[out], t[out]
        sc_hat = sched_cat.total_noise(t_hat) if model.num_classes else sc
    finally:
        model.num_schedule.float(), model.cat_schedule.float()
    observe_mask = -torch.expm1(-sc_next)
    observe_mask[-1] = 1.0
    return SamplerTables(t=t[:, 0], t_hat=t_hat[:, 0], sigma=sigma, sigma_hat=sigma_hat, sigma_next=sigma_next,
                         remask=-torch.expm1(sc - sc_hat), alpha_t=torch.exp(-sc_hat),
                         alpha_s=torch.exp(-sc_next), observe_mask=observe_mask)


@dataclasses.dataclass
class Observed:
    """Cells to keep (imputation / conditional sampling): values plus per-cell ``missing`` masks."""
    x_num: Tensor         # [N, n] float, any value where missing
    x_cat: Tensor         # [N, m] int64, any valid index where missing
    num_missing: Tensor   # [N, n] bool: True = sample this cell
    cat_missing: Tensor   # [N, m] bool

    def rows(self, start: int, stop: int) -> "Observed":
        return Observed(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))


@dataclasses.dataclass
class Guidance:
    """Classifier-free guidance of one target column by an unconditional model of that column."""
    model: TabDiffModel   # trained on the target column alone
    weight: float
    column: int           # index among the numerical (kind "num") or categorical (kind "cat") columns
    kind: str             # "num" or "cat"


class _Network:
    """The denoiser at one step for a whole batch; time embeddings hoisted out of the batch and
    cached per distinct t (they depend on t only)."""

    def __init__(self, model: TabDiffModel, guidance: Optional[Guidance], banned_logits: Sequence[int] = ()):
        self.model, self.guidance = model, guidance
        self.banned = torch.as_tensor(list(banned_logits), dtype=torch.int64)
        self._emb: dict = {}

    def _time_emb(self, net, t: float) -> Tensor:
        key = (id(net), float(t))
        if key not in self._emb:
            self._emb[key] = net.time_emb(torch.tensor([t], dtype=torch.float32))
        return self._emb[key]

    def __call__(self, x_num: Tensor, x_cat: Tensor, t: float, sigma: Tensor,
                 forecast: Optional[TrunkForecast] = None, step: int = 0, euler: bool = True) -> tuple[Tensor, Tensor]:
        """``forecast``: the batch's forecasting state; ``step`` counts sampler steps in sampling
        order (0 = noisiest); ``euler``: the step's first call (False: its Heun call)."""
        net = self.model.network
        sigma32 = sigma.float()
        if forecast is None:
            denoised, logits = net(x_num, x_cat, None, sigma32, time_emb=self._time_emb(net, t))
        else:                                      # Denoiser.forward, with the trunk's output forecast
            x32 = x_num.float()
            hidden = forecast.hidden(net, x32, x_cat, sigma32, self._time_emb(net, t), t, step, euler)
            denoised, logits = net.head(hidden, x32, sigma32)
        if len(self.banned):                       # classes the caller rules out (e.g. the NaN level)
            logits = logits.index_fill(1, self.banned, -math.inf)
        if self.guidance is not None and self.guidance.weight != 0.0:
            denoised, logits = self._guide(x_num, x_cat, t, sigma32, denoised, logits)
        return denoised, logits

    def _guide(self, x_num, x_cat, t, sigma, denoised, logits):
        g, unet = self.guidance, self.guidance.model.network
        if g.kind == "num":
            y_num, y_cat, y_sigma = x_num[:, g.column:g.column + 1], x_cat[:, :0], sigma[g.column:g.column + 1]
        else:
            y_num, y_cat, y_sigma = x_num[:, :0], x_cat[:, g.column:g.column + 1], sigma[:0]
        u_denoised, u_logits = unet(y_num, y_cat, None, y_sigma, time_emb=self._time_emb(unet, t))
        if g.kind == "num":
            denoised = denoised.clone()
            denoised[:, g.column] = ops.tabdiff_guide(denoised[:, g.column], u_denoised[:, 0], g.weight)
        else:
            start = segment_offsets(self.model.num_classes)[g.column]
            width = self.model.num_classes[g.column] + 1
            cond = logits[:, start:start + width].clone()
            uncond = u_logits.clone()
            cond[:, -1] = uncond[:, -1] = -math.inf            # SUBS: MASK is never a prediction
            logits = logits.clone()
            logits[:, start:start + width] = ops.product_of_experts([cond, uncond], [1.0 + g.weight, -g.weight])
        return denoised, logits


def _prior(model: TabDiffModel, tables: SamplerTables, B: int, seed: int, row_start: int,
           observed: Optional[Observed]) -> tuple[Tensor, Tensor]:
    """x_num = (x_obs +) sigma_max eps, every category masked."""
    noise = ops.tabdiff.churn_noise(seed, PRIOR_OFFSET, row_start, B, model.n_num)
    x_num = (noise * tables.sigma[-1]).float()
    if observed is not None:
        x_num = x_num + observed.x_num
    x_cat = torch.tensor(model.num_classes, dtype=torch.int64).expand(B, len(model.num_classes)).clone()
    return x_num, x_cat


@torch.no_grad()
def sample_batch(model: TabDiffModel, tables: SamplerTables, B: int, *, seed: int, row_start: int = 0,
                 heun: bool = True, observed: Optional[Observed] = None, guidance: Optional[Guidance] = None,
                 network: Optional[_Network] = None, on_step: Optional[Callable[[], None]] = None,
                 forecast: Union[ForecastConfig, TrunkForecast, None] = None):
    """Rows ``row_start .. row_start + B - 1`` of the table of ``seed``: ``(x_num [B, n], x_cat [B, m])``.
    ``forecast``: a Spectrum/TaylorSeer/FORA config for ``len(tables.t)`` steps, or a fresh
    :class:`TrunkForecast` for these rows (to read its counts afterwards); None: no forecasting."""
    net = network or _Network(model, guidance)
    K, T = model.num_classes, len(tables.t)
    if forecast is not None and not isinstance(forecast, TrunkForecast):
        forecast = TrunkForecast(forecast, T)
    if forecast is not None and forecast.cache.num_steps != T:
        raise ValueError(f"forecast: the TrunkForecast is for {forecast.cache.num_steps} steps, the tables for {T}")
    key = dict(seed=seed, row_start=row_start)
    x_num, x_cat = _prior(model, tables, B, seed, row_start, observed)
    for i in reversed(range(T)):
        x_hat, c_hat = ops.tabdiff_churn(x_num, x_cat, tables.sigma[i], tables.sigma_hat[i], tables.remask[i], K,
                                         step=i, **key)
        denoised, logits = net(x_hat, c_hat, float(tables.t_hat[i]), tables.sigma_hat[i], forecast, T - 1 - i)
        x_num, x_cat, d = ops.tabdiff_step(x_hat, c_hat, denoised, logits, tables.sigma_hat[i], tables.sigma_next[i],
                                           K, tables.alpha_t[i], tables.alpha_s[i], step=i, **key)
        if heun and i > 0 and model.n_num:
            denoised_next, _ = net(x_num, c_hat, float(tables.t[i - 1]), tables.sigma_next[i], forecast, T - 1 - i,
                                   euler=False)
            x_num = ops.tabdiff_heun(x_hat, x_num, denoised_next, d, tables.sigma_hat[i], tables.sigma_next[i])
        if observed is not None:
            x_num, x_cat = ops.tabdiff_observe(x_num, x_cat, observed.x_num, observed.x_cat, observed.num_missing,
                                               observed.cat_missing, tables.sigma_next[i], tables.observe_mask[i],
                                               K, step=i, **key)
        if on_step is not None:
            on_step()
    return x_num, x_cat


def sample_rows(model: TabDiffModel, num_rows: int, *, seed: int, batch_size: int, steps: int,
                stochastic: bool = True, heun: bool = True, churn: float = 1.0, row_start: int = 0,
                observed: Optional[Observed] = None, guidance: Optional[Guidance] = None,
                banned_logits: Sequence[int] = (), progress: bool = True, desc: str = "sampling",
                forecast: Optional[ForecastConfig] = None) -> tuple[Tensor, Tensor]:
    """Rows ``row_start .. row_start + num_rows - 1`` of the table of ``seed``, in batches.
    ``forecast``: a Spectrum/TaylorSeer/FORA config for ``steps`` steps; its forecast steps skip
    the denoiser's trunk (see ``diffkern.tabdiff.forecasting``)."""
    from tqdm.auto import tqdm

    forecast = check_forecast(forecast, steps)
    model.eval()
    if guidance is not None:
        guidance.model.eval()
    tables = sampler_tables(model, steps, stochastic, churn)
    net = _Network(model, guidance, banned_logits)
    starts = list(range(0, num_rows, batch_size))
    bar = tqdm(total=len(starts) * steps, desc=desc, unit="step", disable=not progress, leave=False)
    parts_num, parts_cat = [], []
    try:
        for start in starts:
            B = min(batch_size, num_rows - start)
            obs = observed.rows(start, start + B) if observed is not None else None
            x_num, x_cat = sample_batch(model, tables, B, seed=seed, row_start=row_start + start, heun=heun,
                                        observed=obs, network=net, on_step=bar.update, forecast=forecast)
            parts_num.append(x_num)
            parts_cat.append(x_cat)
    finally:
        bar.close()
    return torch.cat(parts_num), torch.cat(parts_cat)
