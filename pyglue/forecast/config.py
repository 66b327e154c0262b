"""Configurations of the feature-caching methods: Spectrum and its baselines (FORA, TaylorSeer).

All three cache the same tensor (the last transformer block's output, the input of the model's
output head) and differ only in *when* the blocks run and *how* the skipped steps' feature is
predicted, so comparisons between them are like for like.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

from ..ops import _checks

__all__ = ["SpectrumConfig", "FORAConfig", "TaylorSeerConfig", "MODES"]

MODES = ("clean", "parity")


def _check_schedule(schedule: Optional[Sequence[int]], num_steps: int) -> Optional[Tuple[int, ...]]:
    """``None`` or strictly increasing step indices in ``[0, num_steps)``, as a tuple."""
    if schedule is None:
        return None
    if isinstance(schedule, (str, bytes)) or not hasattr(schedule, "__iter__"):
        raise TypeError(f"schedule: expected a sequence of step indices, got {type(schedule).__name__}")
    steps = tuple(schedule)
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"schedule: expected int step indices, got {s!r}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"schedule: expected strictly increasing step indices, got {list(steps)}")
    if steps and (steps[0] < 0 or steps[-1] >= num_steps):
        raise ValueError(f"schedule: step indices must lie in [0, num_steps={num_steps}), got {list(steps)}")
    return steps


@dataclasses.dataclass(frozen=True)
class SpectrumConfig:
    """Spectrum (Han et al., CVPR 2026): ridge-regressed Chebyshev forecast of the last block.

    Args:
        degree: Chebyshev degree M (P = M + 1 basis functions). Official: 4.
        lam: ridge penalty. Official: 0.1.
        warmup_steps: steps that always run the network. Official: 5.
        window_size: initial real-step interval N. Official: 2.
        flex_window: alpha, growth of the interval after every post-warm-up real step
            (official presets 0.75 and 3.0).
        blend: w in ``w * chebyshev + (1 - w) * taylor1``. Official config default 1.0.
        num_steps: expected sampling steps; a pipeline call with another count adapts the
            schedule (see :func:`diffkern.forecast.real_steps`).
        t_range: (t_min, t_max) of the step-index time axis mapped onto [-1, 1]. ``None``:
            ``(0, num_steps)`` in ``clean`` mode, the official hard-coded ``(0, 50)`` in
            ``parity`` mode.
        mode: ``"clean"`` (fp64 weights, fp32 accumulation, history in the model dtype) or
            ``"parity"`` (official quirks: tau computed in bf16 on the fixed (0, 50) axis,
            history and forecast in bf16).
        penalize_intercept: apply the ridge penalty to T_0 too (official behaviour; shrinks the
            forecast by 4-35 %, harmless before a LayerNorm-based output head).
        schedule: explicit indices of the real (block-running) steps for ``num_steps`` steps,
            replacing the adaptive rule (like cache-dit's ``steps_computation_mask``); ``None``:
            the official schedule. A run with another step count then raises.
    """

    degree: int = 4
    lam: float = 0.1
    warmup_steps: int = 5
    window_size: int = 2
    flex_window: float = 0.75
    blend: float = 1.0
    num_steps: int = 50
    t_range: Optional[Tuple[float, float]] = None
    mode: str = "clean"
    penalize_intercept: bool = True
    schedule: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        _checks.integer("degree", self.degree, 0)
        _checks.real_number("lam", self.lam, minimum=0.0)
        _checks.integer("warmup_steps", self.warmup_steps, 0)
        _checks.integer("window_size", self.window_size, 1)
        _checks.real_number("flex_window", self.flex_window, minimum=0.0)
        _checks.real_number("blend", self.blend, minimum=0.0)
        if self.blend > 1.0:
            raise ValueError(f"blend: expected 0 <= blend <= 1, got {self.blend}")
        _checks.integer("num_steps", self.num_steps, 1)
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.t_range is not None:
            if len(tuple(self.t_range)) != 2 or not float(self.t_range[0]) < float(self.t_range[1]):
                raise ValueError(f"t_range: expected (t_min, t_max) with t_min < t_max, got {self.t_range!r}")
        object.__setattr__(self, "schedule", _check_schedule(self.schedule, self.num_steps))
        if self.lam == 0.0 and self.warmup_steps < self.degree + 1:
            raise ValueError(f"lam=0 needs warmup_steps >= degree + 1 = {self.degree + 1} for a "
                             f"non-singular first fit, got warmup_steps={self.warmup_steps}")

    @property
    def min_history(self) -> int:
        """Recorded steps needed before a forecast is made (fewer: the real step runs).

        P = degree + 1 points, as in the official code, whose first forecast (step 5) is fitted
        from exactly the 5 warm-up steps; at least 2 when the Taylor blend is active."""
        return max(self.degree + 1, 2 if self.blend < 1.0 else 1)

    def resolved_t_range(self, num_steps: int) -> Tuple[float, float]:
        if self.t_range is not None:
            return float(self.t_range[0]), float(self.t_range[1])
        if self.mode == "parity":
            return 0.0, 50.0
        return 0.0, float(num_steps)


@dataclasses.dataclass(frozen=True)
class FORAConfig:
    """FORA (Selvaraju et al. 2024) at the last-block hook: reuse the last real feature.

    ``warmup_steps`` real steps, then a real step every ``interval`` steps (or the explicit
    ``schedule``, as in :class:`SpectrumConfig`)."""

    interval: int = 3
    warmup_steps: int = 5
    num_steps: int = 50
    schedule: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        _checks.integer("interval", self.interval, 1)
        _checks.integer("warmup_steps", self.warmup_steps, 0)
        _checks.integer("num_steps", self.num_steps, 1)
        object.__setattr__(self, "schedule", _check_schedule(self.schedule, self.num_steps))

    @property
    def min_history(self) -> int:
        return 1


@dataclasses.dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer (Liu et al. 2025) at the last-block hook (like diffusers' lite mode).

    Divided differences over the real steps up to ``order``, evaluated by the Taylor formula
    ``sum_i d_i x^i / i!`` at x = steps since the last real step. ``warmup_steps`` plays the
    role of the official ``first_enhance``; then a real step every ``interval`` steps (or the
    explicit ``schedule``, as in :class:`SpectrumConfig`)."""

    interval: int = 4
    order: int = 1
    warmup_steps: int = 5
    num_steps: int = 50
    schedule: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        _checks.integer("interval", self.interval, 1)
        _checks.integer("order", self.order, 0)
        _checks.integer("warmup_steps", self.warmup_steps, 0)
        _checks.integer("num_steps", self.num_steps, 1)
        object.__setattr__(self, "schedule", _check_schedule(self.schedule, self.num_steps))
