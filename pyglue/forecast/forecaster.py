"""Feature caches: the per-stream history and the prediction rule of each method.

A *group* is one model call per sampling step (0 for the only call, or 0/1 for the conditional /
unconditional call when classifier-free guidance runs as two calls); inside a group every batch
row is its own *stream* (so batched CFG branches are separate streams too). Every cache stores
features in their own dtype; nothing is upcast or re-concatenated per step.

Time axis: by default a step's time is its index (the official Spectrum/TaylorSeer convention). A
caller whose network calls do not sit on integer steps (TabDiff: a Heun call between two steps)
passes its own coordinate as ``time=`` to ``record``/``predict``, and its range as
``time_range=`` to the constructor or :func:`make_cache`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .config import SpectrumConfig
from .schedule import real_steps

__all__ = ["FeatureCache", "SpectrumForecaster", "make_cache"]


class FeatureCache:
    """Interface: ``ready(group)``, ``record(group, step, feat)``, ``predict(group, step)``.
    A subclass declares the config class it implements as ``config_type`` (see :func:`make_cache`)."""

    name = "cache"
    config_type: Optional[type] = None
    implementations: List[type] = []        # every subclass with a config_type, in definition order

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_type is not None:
            FeatureCache.implementations.append(cls)

    def __init__(self, config, num_steps: int, time_range: Optional[Tuple[float, float]] = None) -> None:
        self.config = config
        self.num_steps = int(num_steps)
        self.time_range = None if time_range is None else (float(time_range[0]), float(time_range[1]))
        self.schedule: List[int] = real_steps(self.num_steps, config)
        self.real_set = frozenset(self.schedule)

    def reset(self) -> None:
        raise NotImplementedError

    def recorded(self, group: int) -> int:
        raise NotImplementedError

    def ready(self, group: int) -> bool:
        return self.recorded(group) >= self.config.min_history

    def record(self, group: int, step: int, feat: Tensor, time: Optional[float] = None) -> None:
        raise NotImplementedError

    def predict(self, group: int, step: int, time: Optional[float] = None) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _position(step: int, time: Optional[float]) -> float:
        """Where a call sits on the time axis: the caller's ``time``, else the step index."""
        return float(step) if time is None else float(time)

    @staticmethod
    def _check_shape(name: str, expected, feat: Tensor) -> None:
        if expected is not None and (tuple(feat.shape), feat.dtype, feat.device) != expected:
            raise ValueError(f"{name}: the feature changed from shape/dtype/device {expected} to "
                             f"{(tuple(feat.shape), feat.dtype, feat.device)} inside one sampling run; "
                             "call diffkern.spectrum.reset(model) between runs with different inputs")


class _History:
    """Preallocated ``[S, capacity, N]`` buffer; ``buf[:, :count]`` is a strided view."""

    def __init__(self, feat: Tensor, capacity: int, dtype: torch.dtype) -> None:
        self.key = (tuple(feat.shape), feat.dtype, feat.device)
        self.shape = feat.shape
        self.rows = feat.shape[0]
        self.numel = feat[0].numel() if feat.dim() > 0 else 1
        self.buf = torch.empty((self.rows, max(1, capacity), self.numel), dtype=dtype, device=feat.device)
        self.times: List[float] = []

    @property
    def count(self) -> int:
        return len(self.times)

    def append(self, t: float, feat: Tensor) -> None:
        if self.count == self.buf.shape[1]:  # more real steps than planned (fallbacks): grow once
            grown = self.buf.new_empty((self.rows, 2 * self.buf.shape[1], self.numel))
            grown[:, : self.count].copy_(self.buf)
            self.buf = grown
        self.buf[:, self.count].view(self.shape).copy_(feat.detach())
        self.times.append(t)


class SpectrumForecaster(FeatureCache):
    """Spectrum: forecast = ``chebyshev_forecast`` over every recorded real step of the stream.

    Time axis: the integer step index (official). ``clean``: t_range ``(0, num_steps)`` (equal to
    the official ``(0, 50)`` at 50 steps), fp64 weights. ``parity``: the official ``(0, 50)`` axis
    with tau = (t - 25) * 2 / 50 evaluated in bfloat16, and history/forecast stored in bfloat16.
    A caller's own axis (``time_range=`` plus ``time=`` on every call) replaces the step index;
    ``config.t_range``, when set, still wins (it is then in the caller's units); ``clean`` only.
    """

    name = "spectrum"
    config_type = SpectrumConfig

    def __init__(self, config: SpectrumConfig, num_steps: int,
                 time_range: Optional[Tuple[float, float]] = None) -> None:
        super().__init__(config, num_steps, time_range)
        if self.time_range is not None and config.mode == "parity":
            raise ValueError("time_range: parity mode reproduces the official step-index axis; "
                             "a caller's own time axis needs mode='clean'")
        if self.time_range is not None and config.t_range is None:
            self.t_range = self.time_range
        else:
            self.t_range = config.resolved_t_range(self.num_steps)
        self._groups: Dict[int, _History] = {}
        self._time_cache: Dict[tuple, Tensor] = {}

    def reset(self) -> None:
        self._groups.clear()

    def recorded(self, group: int) -> int:
        h = self._groups.get(group)
        return 0 if h is None else h.count

    def time_of(self, step: int, time: Optional[float] = None) -> float:
        """The fit-time coordinate of a step (or of the caller's ``time``) as passed to the operator."""
        if time is not None:
            return float(time)
        if self.config.mode == "parity":
            # Official BaseForecaster._taus in bfloat16: (t - mid) * 2 / rng, all bf16 ops.
            bf = torch.bfloat16
            t = torch.tensor(float(step), dtype=bf)
            t_min = torch.tensor(self.t_range[0], dtype=bf)
            t_max = torch.tensor(self.t_range[1], dtype=bf)
            tau = (t - 0.5 * (t_min + t_max)) * 2.0 / (t_max - t_min)
            return float(tau)
        return float(step)

    def _op_range(self):
        return (-1.0, 1.0) if self.config.mode == "parity" else self.t_range

    def record(self, group: int, step: int, feat: Tensor, time: Optional[float] = None) -> None:
        h = self._groups.get(group)
        if h is not None:
            self._check_shape("feature", h.key, feat)
        else:
            dtype = torch.bfloat16 if self.config.mode == "parity" else feat.dtype
            h = self._groups[group] = _History(feat, len(self.schedule), dtype)
        h.append(self.time_of(step, time), feat)

    def _times(self, h: _History, device) -> Tensor:
        key = (tuple(h.times), device)
        t = self._time_cache.get(key)
        if t is None:
            t = self._time_cache[key] = torch.tensor(h.times, dtype=torch.float64, device=device)
        return t

    def predict(self, group: int, step: int, time: Optional[float] = None) -> Tensor:
        h = self._groups.get(group)
        if h is None or h.count < self.config.min_history:
            raise RuntimeError(f"spectrum: group {group} has {0 if h is None else h.count} recorded "
                               f"steps, a forecast needs {self.config.min_history}")
        c = self.config
        device = h.buf.device
        t_query = torch.tensor([self.time_of(step, time)], dtype=torch.float64, device=device)
        out = ops.chebyshev_forecast(self._times(h, device), h.buf[:, : h.count], t_query,
                                     degree=c.degree, lam=c.lam, t_range=self._op_range(),
                                     blend=c.blend, penalize_intercept=c.penalize_intercept,
                                     out_dtype=h.key[1])                      # [S, 1, N]
        return out[:, 0].view(h.shape)


def make_cache(config, num_steps: Optional[int] = None,
               time_range: Optional[Tuple[float, float]] = None) -> FeatureCache:
    """The feature cache of ``config`` (the subclass declaring its config class) for
    ``num_steps`` steps (default ``config.num_steps``); ``time_range``: see the module doc."""
    for cls in FeatureCache.implementations:
        if isinstance(config, cls.config_type):
            return cls(config, config.num_steps if num_steps is None else num_steps, time_range)
    names = [c.config_type.__name__ for c in FeatureCache.implementations]
    raise TypeError(f"config: expected {', '.join(names[:-1])} or {names[-1]}, got {type(config).__name__}")
