"""Moved to :mod:`diffkern.forecast.forecaster` (shared with TabDiff's forecasting); re-exported here."""

from ..forecast import forecaster as _moved
from ..forecast.forecaster import FeatureCache, SpectrumForecaster, make_cache

__all__ = ["FeatureCache", "SpectrumForecaster", "make_cache"]

ops = _moved.ops       # the operators module the forecaster calls: patching ops.* here patches it there
