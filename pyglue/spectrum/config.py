"""Moved to :mod:`diffkern.forecast.config` (shared with TabDiff's forecasting); re-exported here."""

from ..forecast.config import MODES, FORAConfig, SpectrumConfig, TaylorSeerConfig

__all__ = ["SpectrumConfig", "FORAConfig", "TaylorSeerConfig", "MODES"]
