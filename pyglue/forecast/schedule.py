"""Which sampling steps run the network ("real") and which are forecast."""

from __future__ import annotations

import math
from typing import List, Union

from .config import FORAConfig, SpectrumConfig, TaylorSeerConfig

__all__ = ["real_steps", "fixed_interval_steps"]


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(f"num_steps: expected an int, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    return num_steps


def real_steps(num_steps: int, config: Union[SpectrumConfig, FORAConfig, TaylorSeerConfig, None] = None) -> List[int]:
    """Indices of the steps that run the transformer blocks, in increasing order.

    Spectrum (the official adaptive schedule): the first ``warmup_steps`` steps are real; after
    that a step is real when ``(cached_in_a_row + 1) % floor(curr_ws) == 0``, where ``curr_ws``
    starts at ``window_size`` and grows by ``flex_window`` (rounded to 3 decimals) after every
    post-warm-up real step. 50 steps, alpha 0.75: 0,1,2,3,4,6,8,11,15,20,25,31,38,46; alpha 3.0:
    0,1,2,3,4,6,11,19,30,44.

    FORA / TaylorSeer configs: see :func:`fixed_interval_steps`. A config with an explicit
    ``schedule`` returns it; it only fits ``config.num_steps`` steps (other counts raise).
    """
    num_steps = _check_steps(num_steps)
    config = SpectrumConfig() if config is None else config
    explicit = getattr(config, "schedule", None)
    if explicit is not None:
        if num_steps != config.num_steps:
            raise ValueError(f"num_steps: the config's explicit schedule is for num_steps={config.num_steps}, "
                             f"but this run has {num_steps} steps; pass a schedule for {num_steps} steps")
        return list(explicit)
    if isinstance(config, (FORAConfig, TaylorSeerConfig)):
        return fixed_interval_steps(num_steps, config.interval, config.warmup_steps)
    if not isinstance(config, SpectrumConfig):
        raise TypeError(f"config: expected SpectrumConfig, FORAConfig or TaylorSeerConfig, got {type(config).__name__}")
    steps: List[int] = []
    curr_ws = float(config.window_size)
    cached_in_a_row = 0
    for step in range(num_steps):
        if step < config.warmup_steps:
            steps.append(step)
            continue
        if (cached_in_a_row + 1) % max(1, math.floor(curr_ws)) == 0:
            steps.append(step)
            cached_in_a_row = 0
            curr_ws = round(curr_ws + config.flex_window, 3)
        else:
            cached_in_a_row += 1
    return steps


def fixed_interval_steps(num_steps: int, interval: int, warmup_steps: int) -> List[int]:
    """TaylorSeer's/FORA's schedule: ``warmup_steps`` real steps (TaylorSeer's ``first_enhance``),
    then a real step whenever ``interval - 1`` steps have been cached since the last real one."""
    num_steps = _check_steps(num_steps)
    steps: List[int] = []
    counter = 0
    for step in range(num_steps):
        if step < warmup_steps or counter == interval - 1:
            steps.append(step)
            counter = 0
        else:
            counter += 1
    return steps
