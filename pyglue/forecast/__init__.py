"""diffkern.forecast: feature forecasting shared by the samplers that skip network evaluations.

The caches (the per-stream history of a network feature and the rule that predicts it), their
configurations and the real-step schedules. Two methods use them: ``diffkern.spectrum`` (hooks
into diffusers transformers) and ``diffkern.tabdiff`` (its denoiser's trunk,
``sample(..., forecast=...)``). Nothing here knows about either model.

    cache = make_cache(SpectrumConfig(), num_steps=50)
    for step in range(50):
        if step in cache.real_set or not cache.ready(0):
            feat = run_network(...); cache.record(0, step, feat)
        else:
            feat = cache.predict(0, step)
"""

from .baselines import FORACache, TaylorSeerCache
from .config import FORAConfig, SpectrumConfig, TaylorSeerConfig
from .forecaster import FeatureCache, SpectrumForecaster, make_cache
from .schedule import fixed_interval_steps, real_steps

__all__ = [
    "SpectrumConfig", "FORAConfig", "TaylorSeerConfig", "real_steps", "fixed_interval_steps",
    "FeatureCache", "SpectrumForecaster", "FORACache", "TaylorSeerCache", "make_cache",
]
