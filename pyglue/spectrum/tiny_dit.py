"""The tiny class-conditional DiT shipped with diffkern, trained by
``scripts/train_spectrum_dit.py`` (rectified flow on scikit-learn's 8x8 digits).

It is a stock diffusers ``DiTTransformer2DModel`` saved with ``save_pretrained`` (safetensors,
fp16) under ``diffkern/assets/spectrum/tiny_dit`` and loaded with ``from_pretrained``.
"""

from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["ASSET_DIR", "MODEL_CONFIG", "load_tiny_dit", "training_info", "load_digits", "flow_sample",
           "flow_timesteps", "to_images"]

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "spectrum", "tiny_dit")

# 16 tokens (2x2 patches of an 8x8 image), width 128, 4 blocks: ~1.4M parameters.
MODEL_CONFIG = dict(num_attention_heads=4, attention_head_dim=32, in_channels=1, out_channels=1,
                    num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                    norm_num_groups=1)


def load_tiny_dit(path: Optional[str] = None, dtype: torch.dtype = torch.float32, device="cpu"):
    """Load the shipped weights (no download) as an eval-mode ``DiTTransformer2DModel``."""
    from .._optional import require
    DiTTransformer2DModel = require("diffusers", "diffkern.spectrum's tiny DiT").DiTTransformer2DModel

    path = ASSET_DIR if path is None else path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no tiny DiT weights at {path}; train them with "
                                "`python scripts/train_spectrum_dit.py`")
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()  # silence the optional-`accelerate` notice
    try:
        model = DiTTransformer2DModel.from_pretrained(path, torch_dtype=dtype)
    finally:
        dlogging.set_verbosity(level)
    return model.to(device).eval()


# What the sampler must match and the weights' config.json does not say (older weights: defaults).
TRAINING_DEFAULTS = {"timestep_scale": 1000.0}


def training_info(path: Optional[str] = None) -> dict:
    """The ``training.json`` written next to the weights by the training script, with defaults
    for the keys the sampler needs (``timestep_scale``: model timestep = scale * t)."""
    path = ASSET_DIR if path is None else path
    info = dict(TRAINING_DEFAULTS)
    f = os.path.join(path, "training.json")
    if os.path.isfile(f):
        with open(f) as fh:
            info.update(json.load(fh))
    return info


def load_digits(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """scikit-learn's 1797 8x8 digits as ``[-1, 1]`` images ``[1797, 1, S, S]`` and labels;
    ``image_size`` other than 8 resamples them bilinearly (smooth larger images)."""
    from .._optional import require
    _load = require("sklearn.datasets", "the tiny DiT's digits data").load_digits

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 2:
        raise ValueError(f"image_size: expected an int >= 2, got {image_size!r}")
    d = _load()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    if image_size != 8:
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)
    return images, torch.tensor(d.target, dtype=torch.long)


def flow_timesteps(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` times from 1 to 0: uniform, then shifted like diffusers'
    ``FlowMatchEulerDiscreteScheduler(shift=...)``: t' = shift t / (1 + (shift - 1) t).
    ``shift > 1`` spends more steps at high noise (SD3 uses 3), ``shift < 1`` at low noise."""
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift: expected a finite number > 0, got {shift!r}")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    shifted = shift * t / (1.0 + (shift - 1.0) * t)
    shifted[0] = 1.0  # exactly pure noise (the formula can round to 1 + 1 ulp)
    return shifted


@torch.no_grad()
def flow_sample(model, noise: Tensor, labels: Tensor, num_steps: int = 50,
                callback: Optional[Callable[[int], None]] = None, shift: float = 1.0,
                timestep_scale: float = 1000.0) -> Tensor:
    """Rectified-flow Euler sampler: x_1 = noise, x_{t-dt} = x_t - dt v(x_t, t), t = 1 -> 0 on
    :func:`flow_timesteps` (uniform at the default ``shift=1``).

    The model sees ``timestep = timestep_scale * t``: what it was trained with (1000 for the
    shipped weights, as diffusers' DiT/SD3 pipelines; see :func:`training_info`)."""
    x = noise
    ts = flow_timesteps(num_steps, shift)
    for i in range(num_steps):
        t = torch.full((x.shape[0],), float(ts[i]) * timestep_scale, dtype=x.dtype, device=x.device)
        v = model(x, timestep=t, class_labels=labels, return_dict=False)[0]
        x = x + float(ts[i + 1] - ts[i]) * v
        if callback is not None:
            callback(i)
    return x


def to_images(x: Tensor) -> Tensor:
    """Model space ``[-1, 1]`` -> ``[0, 1]`` images."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)
