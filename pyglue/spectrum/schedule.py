"""Moved to :mod:`diffkern.forecast.schedule` (shared with TabDiff's forecasting); re-exported here."""

from ..forecast.schedule import fixed_interval_steps, real_steps

__all__ = ["real_steps", "fixed_interval_steps"]
