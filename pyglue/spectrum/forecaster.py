"""Moved to :mod:`diffkern.forecast.forecaster` (shared with TabDiff's forecasting); re-exported here."""

from .. import ops  # noqa: F401  (the module the forecaster calls; patching ops.* here patches it there)
from ..forecast.forecaster import FeatureCache, SpectrumForecaster, make_cache

__all__ = ["FeatureCache", "SpectrumForecaster", "make_cache"]
