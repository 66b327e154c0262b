"""diffkern.spectrum: Spectrum feature forecasting for diffusion transformers (issue #4).

    from diffkern import spectrum
    spectrum.enable(pipe, spectrum.SpectrumConfig(flex_window=0.75))   # or pipe.transformer
    images = pipe(prompt, num_inference_steps=50).images
    spectrum.disable(pipe)

Baselines in the same framework: ``FORAConfig``, ``TaylorSeerConfig`` (pass them to ``enable``).
"""

from .baselines import FORACache, TaylorSeerCache
from .config import FORAConfig, SpectrumConfig, TaylorSeerConfig
from .forecaster import FeatureCache, SpectrumForecaster, make_cache
from .hooks import BlockAdapter, SpectrumState, disable, enable, reset, state
from .schedule import fixed_interval_steps, real_steps

__all__ = [
    "SpectrumConfig", "FORAConfig", "TaylorSeerConfig", "real_steps", "fixed_interval_steps",
    "enable", "disable", "reset", "state", "SpectrumState", "BlockAdapter",
    "FeatureCache", "SpectrumForecaster", "FORACache", "TaylorSeerCache", "make_cache",
]
