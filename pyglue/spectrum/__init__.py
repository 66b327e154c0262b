"""diffkern.spectrum: Spectrum feature forecasting for diffusion transformers (issue #4).

    from diffkern import spectrum
    spectrum.enable(pipe, spectrum.SpectrumConfig(flex_window=0.75))   # or pipe.transformer
    images = pipe(prompt, num_inference_steps=50).images
    spectrum.disable(pipe)

Baselines in the same framework: ``FORAConfig``, ``TaylorSeerConfig`` (pass them to ``enable``).
The caches, configs and schedules live in :mod:`diffkern.forecast` (shared with TabDiff) and are
re-exported here.
"""

from ..forecast import (FeatureCache, FORACache, FORAConfig, SpectrumConfig, SpectrumForecaster,
                        TaylorSeerCache, TaylorSeerConfig, fixed_interval_steps, make_cache, real_steps)
from .hooks import BlockAdapter, SpectrumState, disable, enable, reset, state

__all__ = [
    "SpectrumConfig", "FORAConfig", "TaylorSeerConfig", "real_steps", "fixed_interval_steps",
    "enable", "disable", "reset", "state", "SpectrumState", "BlockAdapter",
    "FeatureCache", "SpectrumForecaster", "FORACache", "TaylorSeerCache", "make_cache",
]
