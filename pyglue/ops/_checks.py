"""Argument checks shared by the operator files: every error names the argument, what was
seen and what was expected. Only shapes, dtypes and Python scalars are checked here, so these
run unchanged under ``torch.compile``; value checks (NaN, duplicates) live inside the ops."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # what the compiled backends take


def tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def ndim(name: str, value: torch.Tensor, allowed: Sequence[int], layout: str) -> None:
    if value.dim() not in allowed:
        raise ValueError(f"{name}: expected {layout}, got shape {tuple(value.shape)}")


def floating(name: str, value: torch.Tensor, allowed=FLOAT_DTYPES) -> None:
    if value.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name}: expected a floating dtype ({names}), got {value.dtype}")


def real_number(name: str, value, minimum: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected >= {minimum}, got {value}")
    return value


def integer(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must share one device, got {seen}")


def out_dtype(name: str, value, default: torch.dtype) -> torch.dtype:
    if value is None:
        return default
    if not isinstance(value, torch.dtype) or value not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected None or a floating torch.dtype, got {value!r}")
    return value
