"""Fitted transforms between a DataFrame and the model's tensors, and back.

* numerical / datetime column: quantile-normal transform as the official code (sklearn's
  ``QuantileTransformer(output_distribution='normal', n_quantiles=max(min(N // 30, 1000), 10))``,
  re-implemented in numpy so its state is two arrays, not a pickle), inverted after sampling,
  then rounded (integer columns; datetimes to their training resolution) and clipped to the
  training range. Datetimes go through epoch seconds. A constant column is not modelled.
* missing numerical values are *modelled*: the column gets a two-level categorical companion
  ``"<name> (missing)"`` that the model learns, and the numerical slot is filled with a random
  observed value (seeded), so the value distribution keeps no artificial spike. A sampled
  missing flag gives NaN back.
* categorical column: its sorted levels, plus a NaN level when it had missing values.

Model layout: ``x_num [N, n]`` = the modelled numerical/datetime columns in schema order;
``x_cat [N, m]`` = the categorical columns in schema order, then the missing flags.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .schema import ColumnSpec, SchemaError

BOUNDS_THRESHOLD = 1e-7        # sklearn's clip of the uniform before the normal quantile
MISSING_SUFFIX = " (missing)"
_SECONDS = (86_400, 3_600, 60, 1)


# --------------------------------------------------------------------------------------------
# Quantile-normal transform (sklearn's algorithm)
# --------------------------------------------------------------------------------------------

def fit_quantiles(values: np.ndarray) -> np.ndarray:
    """The ``n_quantiles`` quantiles of ``values`` (no NaN) at evenly spaced references."""
    n = len(values)
    n_quantiles = min(max(min(n // 30, 1000), 10), n)
    references = np.linspace(0, 1, n_quantiles)
    return np.maximum.accumulate(np.percentile(values, references * 100))


def _norm_ppf(p: np.ndarray) -> np.ndarray:
    return torch.special.ndtri(torch.from_numpy(np.asarray(p, dtype=np.float64))).numpy()


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(z, dtype=np.float64))).numpy()


def quantile_forward(x: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    references = np.linspace(0, 1, len(quantiles))
    lower = x - BOUNDS_THRESHOLD < quantiles[0]
    upper = x + BOUNDS_THRESHOLD > quantiles[-1]
    # the mean of the forward and backward interpolations maps ties to the middle of their range
    u = 0.5 * (np.interp(x, quantiles, references) - np.interp(-x, -quantiles[::-1], -references[::-1]))
    u[upper], u[lower] = 1.0, 0.0
    clip = BOUNDS_THRESHOLD - np.spacing(1)
    return np.clip(_norm_ppf(u), _norm_ppf(clip), _norm_ppf(1 - clip))


def quantile_inverse(z: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    references = np.linspace(0, 1, len(quantiles))
    u = _norm_cdf(z)
    lower = u - BOUNDS_THRESHOLD < 0
    upper = u + BOUNDS_THRESHOLD > 1
    x = np.interp(u, references, quantiles)
    x[upper], x[lower] = quantiles[-1], quantiles[0]
    return x


# --------------------------------------------------------------------------------------------
# Column state
# --------------------------------------------------------------------------------------------

def _epoch_seconds(series: pd.Series) -> np.ndarray:
    s = series.dt.tz_convert("UTC").dt.tz_localize(None) if series.dt.tz is not None else series
    ns = s.astype("datetime64[ns]").to_numpy().astype("int64").astype(np.float64)
    ns[series.isna().to_numpy()] = np.nan
    return ns / 1e9


def _datetime_resolution(seconds: np.ndarray) -> float:
    """The coarsest of day/hour/minute/second that every training value is a multiple of (0: none)."""
    for step in _SECONDS:
        if np.all(np.mod(seconds, step) == 0):
            return float(step)
    return 0.0


@dataclasses.dataclass
class NumericalState:
    quantiles: Optional[np.ndarray]   # None for a constant column (not modelled)
    minimum: float
    maximum: float
    resolution: float = 0.0           # datetime rounding step in seconds


def _numeric_values(spec: ColumnSpec, series: pd.Series) -> np.ndarray:
    if spec.kind == "datetime":
        return _epoch_seconds(series)
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


class TableTransform:
    """Fitted on a training DataFrame; ``encode`` -> tensors, ``decode`` -> DataFrame."""

    def __init__(self, schema: list[ColumnSpec]):
        self.schema = schema
        self.numerical: dict[str, NumericalState] = {}

    # ---- layout ------------------------------------------------------------------------------

    @property
    def num_columns(self) -> list[str]:
        return [s.name for s in self.schema if s.kind in ("numerical", "datetime")
                and self.numerical[s.name].quantiles is not None]

    @property
    def missing_flags(self) -> list[str]:
        return [s.name for s in self.schema if s.kind in ("numerical", "datetime") and s.nullable]

    @property
    def cat_columns(self) -> list[str]:
        return [s.name for s in self.schema if s.kind == "categorical"] + \
               [name + MISSING_SUFFIX for name in self.missing_flags]

    def levels(self, spec: ColumnSpec) -> list:
        return list(spec.categories) + ([None] if spec.nullable else [])

    @property
    def num_classes(self) -> list[int]:
        cats = [len(self.levels(s)) for s in self.schema if s.kind == "categorical"]
        return cats + [2] * len(self.missing_flags)

    def spec(self, name: str) -> ColumnSpec:
        for s in self.schema:
            if s.name == name:
                return s
        raise KeyError(name)

    # ---- fit ---------------------------------------------------------------------------------

    def fit(self, df: pd.DataFrame) -> "TableTransform":
        for spec in self.schema:
            if spec.kind not in ("numerical", "datetime"):
                continue
            values = _numeric_values(spec, df[spec.name])
            observed = values[~np.isnan(values)]
            if not np.all(np.isfinite(observed)):
                raise SchemaError(f"column {spec.name!r}: holds infinite values; replace them before fitting")
            constant = observed.min() == observed.max()
            self.numerical[spec.name] = NumericalState(
                quantiles=None if constant else fit_quantiles(observed), minimum=float(observed.min()),
                maximum=float(observed.max()),
                resolution=_datetime_resolution(observed) if spec.kind == "datetime" else 0.0)
        return self

    # ---- encode ------------------------------------------------------------------------------

    def _category_codes(self, spec: ColumnSpec, series: pd.Series, argument: str) -> tuple[np.ndarray, np.ndarray]:
        """Codes of the levels (NaN -> the NaN level if any), and where the value was missing."""
        values = series.astype(object) if isinstance(series.dtype, pd.CategoricalDtype) else series
        codes = pd.Categorical(values, categories=spec.categories).codes.astype(np.int64)
        missing = series.isna().to_numpy()
        unseen = (codes < 0) & ~missing
        if unseen.any():
            bad = list(pd.unique(series[unseen]))[:5]
            raise ValueError(f"{argument}: column {spec.name!r} holds categories never seen in training: {bad} "
                             f"(known: {spec.categories[:20]}{' ...' if len(spec.categories) > 20 else ''})")
        codes[missing] = len(spec.categories) if spec.nullable else 0
        return codes, missing

    def encode(self, df: pd.DataFrame, *, fill_seed: int = 0, argument: str = "data"):
        """``(x_num [N, n] float32, x_cat [N, m] int64, num_nan [N, n] bool, cat_nan [N, m] bool)``.

        NaN numerical cells get a random observed value and the missing flag; NaN categorical
        cells the NaN level (or 0 if the column had none: ``cat_nan`` marks them either way)."""
        rng = np.random.default_rng(fill_seed)
        x_num, num_nan, x_cat, cat_nan, flags = [], [], [], [], []
        for spec in self.schema:
            series = df[spec.name]
            if spec.kind == "categorical":
                codes, missing = self._category_codes(spec, series, argument)
                x_cat.append(codes)
                cat_nan.append(missing)
            elif spec.kind in ("numerical", "datetime"):
                values = _numeric_values(spec, series)
                missing = np.isnan(values)
                if spec.nullable:
                    flags.append(missing.astype(np.int64))
                state = self.numerical[spec.name]
                if state.quantiles is None:
                    continue
                if missing.any():               # random observed values: no artificial spike
                    values = values.copy()
                    values[missing] = rng.choice(state.quantiles, size=int(missing.sum()))
                x_num.append(quantile_forward(values, state.quantiles))
                num_nan.append(missing)
        # missing flags: observed for sure where the value is given; imputation decides the rest
        cat_nan.extend(np.zeros_like(f, dtype=bool) for f in flags)
        x_cat.extend(flags)
        N = len(df)
        as_num = lambda cols, dtype: torch.from_numpy(np.stack(cols, 1).astype(dtype)) if cols else \
            torch.zeros(N, 0, dtype=torch.float32 if dtype == np.float32 else torch.bool)  # noqa: E731
        return (as_num(x_num, np.float32), torch.from_numpy(np.stack(x_cat, 1)) if x_cat else torch.zeros(N, 0, dtype=torch.int64),
                as_num(num_nan, bool), as_num(cat_nan, bool))

    # ---- decode ------------------------------------------------------------------------------

    def _restore(self, spec: ColumnSpec, values: pd.Series) -> pd.Series:
        try:
            if spec.dtype == "category":
                cats = spec.dtype_categories if spec.dtype_categories is not None else spec.categories
                return pd.Series(pd.Categorical(values, categories=cats, ordered=spec.ordered), name=spec.name)
            if spec.dtype in ("bool", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32", "uint64") \
                    and values.isna().any():
                return values                   # a NaN was sampled into a non-nullable dtype
            return values.astype(spec.dtype)
        except (TypeError, ValueError):
            return values

    def _decode_numerical(self, spec: ColumnSpec, z: Optional[np.ndarray], N: int, clip: bool,
                          round_integers: bool) -> np.ndarray:
        state = self.numerical[spec.name]
        if state.quantiles is None:
            return np.full(N, state.minimum)
        x = quantile_inverse(z.astype(np.float64), state.quantiles)
        if clip:
            x = np.clip(x, state.minimum, state.maximum)
        if spec.kind == "datetime" and state.resolution:
            x = np.round(x / state.resolution) * state.resolution
        elif spec.integer and round_integers:
            x = np.round(x)
        return x

    def _as_datetime(self, spec: ColumnSpec, seconds: np.ndarray) -> pd.Series:
        ns = np.round(seconds * 1e9)
        out = pd.to_datetime(pd.Series(ns, dtype="float64").astype("Int64"), unit="ns")
        if spec.tz:
            out = out.dt.tz_localize("UTC").dt.tz_convert(spec.tz)
        return out.astype(spec.dtype) if not spec.tz else out

    def decode(self, x_num: Tensor, x_cat: Tensor, *, clip: bool = True, round_integers: bool = True) -> pd.DataFrame:
        N = x_num.shape[0]
        z = x_num.detach().double().numpy()
        codes = x_cat.detach().numpy()
        num_index = {name: i for i, name in enumerate(self.num_columns)}
        cat_index = {name: i for i, name in enumerate(self.cat_columns)}
        out = {}
        for spec in self.schema:
            if spec.kind == "categorical":
                levels = np.array([np.nan if v is None else v for v in self.levels(spec)] + [np.nan], dtype=object)
                values = pd.Series(levels[codes[:, cat_index[spec.name]]], name=spec.name)
                out[spec.name] = self._restore(spec, values)
            elif spec.kind in ("numerical", "datetime"):
                i = num_index.get(spec.name)
                x = self._decode_numerical(spec, z[:, i] if i is not None else None, N, clip, round_integers)
                if spec.nullable:
                    x = np.where(codes[:, cat_index[spec.name + MISSING_SUFFIX]] == 1, np.nan, x)
                if spec.kind == "datetime":
                    out[spec.name] = self._as_datetime(spec, x)
                else:
                    out[spec.name] = self._restore(spec, pd.Series(x, name=spec.name))
            else:                               # id: fresh identifiers 0 .. N-1
                ids = pd.Series(np.arange(N), name=spec.name)
                out[spec.name] = ids if "int" in spec.dtype.lower() else ids.astype(str).astype(spec.dtype)
        return pd.DataFrame(out)

    # ---- state -------------------------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"quantiles.{name}": s.quantiles for name, s in self.numerical.items() if s.quantiles is not None}

    def json_state(self) -> dict:
        return {name: {"minimum": s.minimum, "maximum": s.maximum, "resolution": s.resolution,
                       "constant": s.quantiles is None} for name, s in self.numerical.items()}

    @classmethod
    def from_state(cls, schema: list[ColumnSpec], state: dict, arrays: dict[str, np.ndarray]) -> "TableTransform":
        out = cls(schema)
        for name, s in state.items():
            out.numerical[name] = NumericalState(
                quantiles=None if s["constant"] else np.asarray(arrays[f"quantiles.{name}"], dtype=np.float64),
                minimum=s["minimum"], maximum=s["maximum"], resolution=s["resolution"])
        return out
