"""Baselines in the same framework as Spectrum (same hook point, same warm-up): FORA and TaylorSeer.
Each cache declares the config it implements (``config_type``); :func:`diffkern.forecast.make_cache`
picks the cache of a config from those declarations."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .config import FORAConfig, TaylorSeerConfig
from .forecaster import FeatureCache

__all__ = ["FORACache", "TaylorSeerCache"]


class FORACache(FeatureCache):
    """FORA: the forecast is the feature of the last real step (plain reuse)."""

    name = "fora"
    config_type = FORAConfig

    def __init__(self, config: FORAConfig, num_steps: int,
                 time_range: Optional[Tuple[float, float]] = None) -> None:
        super().__init__(config, num_steps, time_range)
        self._last: Dict[int, Tensor] = {}

    def reset(self) -> None:
        self._last.clear()

    def recorded(self, group: int) -> int:
        return int(group in self._last)

    def record(self, group: int, step: int, feat: Tensor, time: Optional[float] = None) -> None:
        last = self._last.get(group)
        if last is None:
            self._last[group] = feat.detach().clone()
        else:
            self._check_shape("feature", (tuple(last.shape), last.dtype, last.device), feat)
            last.copy_(feat.detach())

    def predict(self, group: int, step: int, time: Optional[float] = None) -> Tensor:
        return self._last[group]


class TaylorSeerCache(FeatureCache):
    """TaylorSeer: divided differences of the real-step features, Taylor-expanded in steps.

    On a real step at ``s`` after the previous real step ``s'`` (d = s - s'): ``D_0 = f``,
    ``D_{i+1} = (D_i - D_i_old) / d`` for i < order while the old factor exists; as in the
    official ``derivative_approximation`` the differences are only refreshed for
    ``step > warmup_steps - 2`` (``first_enhance - 2``). Prediction at ``s + x``:
    ``sum_i D_i x^i / i!`` over the factors present (official ``taylor_formula``).

    With a caller's time axis (``time=``), d and x are measured on it instead of in steps; a
    record at the same time as the previous one (possible there, e.g. a Heun call at the next
    step's level) refreshes D_0 and keeps the differences (a zero gap has no slope)."""

    name = "taylorseer"
    config_type = TaylorSeerConfig

    def __init__(self, config: TaylorSeerConfig, num_steps: int,
                 time_range: Optional[Tuple[float, float]] = None) -> None:
        super().__init__(config, num_steps, time_range)
        self._factors: Dict[int, List[Tensor]] = {}
        self._last_at: Dict[int, float] = {}

    def reset(self) -> None:
        self._factors.clear()
        self._last_at.clear()

    def recorded(self, group: int) -> int:
        return len(self._factors.get(group, ()))

    def ready(self, group: int) -> bool:
        """One real step suffices: the formula uses the factors present (order 0 until a second
        real step), as the official code does."""
        return self.recorded(group) >= 1

    def record(self, group: int, step: int, feat: Tensor, time: Optional[float] = None) -> None:
        old = self._factors.get(group, [])
        if old:
            self._check_shape("feature", (tuple(old[0].shape), old[0].dtype, old[0].device), feat)
        new = [feat.detach().clone()]
        at = self._position(step, time)
        prev = self._last_at.get(group)
        if prev is not None and at == prev:
            new.extend(old[1:])
        elif prev is not None and step > self.config.warmup_steps - 2:
            d = at - prev
            for i in range(self.config.order):
                if i >= len(old):
                    break
                acc = torch.promote_types(feat.dtype, torch.float32)
                new.append((new[i].to(acc) - old[i].to(acc)).div_(d).to(feat.dtype))
        self._factors[group] = new
        self._last_at[group] = at

    def predict(self, group: int, step: int, time: Optional[float] = None) -> Tensor:
        factors = self._factors[group]
        x = self._position(step, time) - self._last_at[group]
        acc = torch.promote_types(factors[0].dtype, torch.float32)
        out = factors[0].to(acc)
        for i in range(1, len(factors)):
            out = out + factors[i].to(acc) * (x ** i / math.factorial(i))
        return out.to(factors[0].dtype)
