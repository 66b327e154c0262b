"""Moved to :mod:`diffkern.forecast.baselines` (shared with TabDiff's forecasting); re-exported here."""

from ..forecast.baselines import FORACache, TaylorSeerCache

__all__ = ["FORACache", "TaylorSeerCache"]
