"""Forecasting TabDiff's denoiser trunk with Spectrum, TaylorSeer or FORA (issue #12, item 4).

``sample(..., forecast=SpectrumConfig())`` runs the sampler as usual but, on the steps the
config's schedule marks as forecast, skips the expensive part of the denoiser and predicts its
output from the features of the steps that ran. The caches are :mod:`diffkern.forecast`'s, the
same ones Spectrum's diffusers hooks use.

Choices (and why):

* **Feature**: the trunk's output tokens ``[B, n_tokens, d_token]`` (``Denoiser.hidden``), the
  decoder's input. A forecast call skips tokenizer, encoder and trunk (the trunk's MLP is most
  of the network's work) and still runs decoder, reconstructor and preconditioning, which
  depend on the current ``x_num`` (the EDM skip connection ``c_skip x``). It is the narrowest
  tensor after the trunk (60 floats per Adult row, against ``dim_t`` = 256 or 1024 inside it),
  so the history of every row is cheap, and it is the analogue of Spectrum's last-block output.
  Every row is its own stream (the feature is ``[B, ...]``): the forecast is per row and, as it
  is deterministic given the row's history, independent of the batch size.
* **Time axis**: the network's own noise-level input ``c_noise = log(sigma_ref(t)) / 4``. The
  trunk sees time only through it, the sampler's calls sit at two kinds of levels (``t_hat[i]``
  after churn, ``t[i-1]`` for Heun) that no step index places correctly, and EDM's log-sigma is
  the parametrisation in which the denoiser varies smoothly. Its range over t in [0, 1] maps
  onto Chebyshev's [-1, 1] (``SpectrumConfig.t_range``, when set, is in c_noise units).
  TaylorSeer's differences and Taylor steps are measured on the same axis.
* **Steps and Heun**: the config's schedule (``num_steps`` must equal ``steps``) is over sampler
  steps, counted in sampling order (step 0 = the noisiest, i = T-1). A real step runs the trunk
  for both of its calls (the Euler call and, when there is one, the Heun call) and records both
  features at their c_noise; a forecast step forecasts both. The two kinds of call keep separate
  histories (stream groups, as Spectrum keeps one per CFG branch): the Heun call reads the
  step's categories *before* they are unmasked, so the two kinds lie on different input
  sequences and one history through both would zigzag. A forecast step whose cache is not yet
  ready (too little history) runs for real. NFE is the number of real trunk evaluations per
  row: :func:`trunk_evaluations`; the plain sampler has ``2 * steps - 1`` with Heun.
* **Guidance**: the unconditional model of classifier-free guidance (impute) always runs real;
  it is a separate, small network and forecasting it would need its own history.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Union

import torch
from torch import Tensor

from ..forecast import FORAConfig, SpectrumConfig, TaylorSeerConfig, make_cache
from .network import Denoiser, c_noise

__all__ = ["ForecastConfig", "check_forecast", "TrunkForecast", "trunk_evaluations"]

ForecastConfig = Union[SpectrumConfig, TaylorSeerConfig, FORAConfig]
_CONFIGS = (SpectrumConfig, TaylorSeerConfig, FORAConfig)
EULER, HEUN = 0, 1                            # stream groups: a step's first call, its Heun call
C_NOISE_RANGE = (float(c_noise(torch.tensor(0.0, dtype=torch.float64))),
                 float(c_noise(torch.tensor(1.0, dtype=torch.float64))))


def check_forecast(forecast, steps: int) -> Optional[ForecastConfig]:
    """``forecast`` if it is ``None`` or a forecast config for ``steps`` sampler steps, else raise."""
    if forecast is None:
        return None
    if not isinstance(forecast, _CONFIGS):
        raise TypeError(f"forecast: expected SpectrumConfig, TaylorSeerConfig, FORAConfig or None, "
                        f"got {type(forecast).__name__}")
    if forecast.num_steps != steps:
        raise ValueError(f"forecast: the config is for num_steps={forecast.num_steps} but the sampler runs "
                         f"steps={steps}; pass dataclasses.replace(config, num_steps={steps}) or steps="
                         f"{forecast.num_steps}")
    if isinstance(forecast, SpectrumConfig) and forecast.mode != "clean":
        raise ValueError(f"forecast: SpectrumConfig mode={forecast.mode!r} reproduces the official DiT code's "
                         "step-index axis; TabDiff forecasts on c_noise and needs mode='clean'")
    return forecast


def _time(t: float) -> float:
    return float(c_noise(torch.tensor(t, dtype=torch.float64)))


class TrunkForecast:
    """Forecasting state of one batch: the feature cache and counts of real / forecast calls.

    ``shadow=True`` (diagnostics): every forecast call also runs the trunk, without using it,
    and appends ``(step, forecast error, step-to-step change, feature norm)`` (Frobenius
    norms over the batch) to ``errors``; the change is from the true feature of the same kind of
    call (Euler or Heun) one step earlier.
    """

    def __init__(self, config: ForecastConfig, steps: int, shadow: bool = False) -> None:
        self.config = check_forecast(config, steps)
        if self.config is None:
            raise TypeError("config: expected SpectrumConfig, TaylorSeerConfig or FORAConfig, got None")
        self.cache = make_cache(self.config, steps, time_range=C_NOISE_RANGE)
        self.trunk_calls = 0
        self.forecast_calls = 0
        self.shadow = shadow
        self.errors: List[tuple] = []
        self._last_true: Dict[int, Tensor] = {}       # group -> true feature of its previous call (shadow)

    def runs_trunk(self, step: int, euler: bool = True) -> bool:
        return step in self.cache.real_set or not self.cache.ready(EULER if euler else HEUN)

    def hidden(self, net: Denoiser, x_num: Tensor, x_cat: Tensor, sigma: Tensor, time_emb: Tensor,
               t: float, step: int, euler: bool) -> Tensor:
        """The decoder's input for this call: the trunk's output on a real step (recorded), the
        cache's forecast at c_noise(t) otherwise. ``euler``: the step's first call (not Heun)."""
        time, group = _time(t), EULER if euler else HEUN
        if self.runs_trunk(step, euler):
            hidden = net.hidden(x_num, x_cat, sigma, time_emb)
            self.cache.record(group, step, hidden, time=time)
            self.trunk_calls += 1
            if self.shadow:
                self._last_true[group] = hidden
            return hidden
        forecast = self.cache.predict(group, step, time=time)
        self.forecast_calls += 1
        if self.shadow:
            self._measure(group, step, forecast, net.hidden(x_num, x_cat, sigma, time_emb))
        return forecast

    def _measure(self, group: int, step: int, forecast: Tensor, true: Tensor) -> None:
        last = self._last_true.get(group)
        change = math.nan if last is None else float((true - last).norm())
        self.errors.append((step, float((forecast - true).norm()), change, float(true.norm())))
        self._last_true[group] = true


def trunk_evaluations(forecast: Optional[ForecastConfig], steps: int, heun_calls: bool = True) -> int:
    """Real trunk evaluations per row of one sampling run (its NFE): ``steps`` Euler calls plus
    ``steps - 1`` Heun calls when ``heun_calls`` (Heun on, numerical columns present), minus the
    forecast ones. Replays :class:`TrunkForecast`'s decisions with a dummy feature."""
    if forecast is None:
        return steps + (steps - 1 if heun_calls else 0)
    state = TrunkForecast(forecast, steps)
    dummy = torch.zeros(1, 1)
    count = 0
    for step in range(steps):
        groups = (EULER, HEUN) if heun_calls and step < steps - 1 else (EULER,)
        for group in groups:
            if state.runs_trunk(step, group == EULER):
                # distinct dummy times, as the sampler's calls are (they only matter to be distinct)
                state.cache.record(group, step, dummy, time=float(count))
                count += 1
    return count
