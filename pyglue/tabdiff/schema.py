"""Column metadata: what each DataFrame column is, detected from its dtype or declared.

Kinds: ``numerical`` (float or integer), ``categorical`` (object, string, category, bool, or
declared), ``datetime`` (modelled as a numeric epoch, returned as datetimes) and ``id`` (not
modelled: fresh identifiers are generated). A schema is plain JSON, so it travels inside the
saved artifact and can be edited by hand::

    schema = detect_schema(df, overrides={"zip": "categorical", "customer_id": "id"})
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Union

import numpy as np
import pandas as pd

KINDS = ("numerical", "categorical", "datetime", "id")
_ID_NAME = re.compile(r"(^|[_\W])(id|uuid|key)$|Id$|ID$", re.IGNORECASE)


class SchemaError(ValueError):
    """A column cannot be modelled as detected or declared; the message names the column."""


@dataclasses.dataclass
class ColumnSpec:
    name: str
    kind: str
    dtype: str                       # the pandas dtype to restore, e.g. "int64", "category", "object"
    integer: bool = False            # numerical: round after sampling
    nullable: bool = False           # had missing values in the training data
    categories: Optional[list] = None        # categorical: observed levels (JSON scalars), sorted
    dtype_categories: Optional[list] = None  # category dtype: every declared level, in order
    ordered: bool = False            # category dtype: ordered
    tz: Optional[str] = None         # datetime: the timezone, if tz-aware

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)} | {
            "name": self.name, "kind": self.kind, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ColumnSpec":
        return cls(**data)


def _json_scalar(column: str, value):
    """A category level as a JSON scalar (str, int, float, bool); anything else is refused."""
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, str):
        return value
    raise SchemaError(f"column {column!r}: category level {value!r} of type {type(value).__name__} cannot be "
                      "stored; convert the column to strings first (df[col].astype(str))")


def _sorted_levels(column: str, values: pd.Series) -> list:
    levels = [_json_scalar(column, v) for v in pd.unique(values.dropna())]
    try:
        return sorted(levels)
    except TypeError:               # mixed types: a stable order by type name, then value
        return sorted(levels, key=lambda v: (type(v).__name__, str(v)))


def _detect_kind(column: str, series: pd.Series) -> str:
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) or pd.api.types.is_bool_dtype(dtype):
        return "categorical"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    if pd.api.types.is_timedelta64_dtype(dtype):
        raise SchemaError(f"column {column!r}: timedelta columns are not supported; convert it to a number "
                          "(e.g. df[col].dt.total_seconds()) or declare it")
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_complex_dtype(dtype):
        return "numerical"
    if pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype):
        return "categorical"
    raise SchemaError(f"column {column!r}: dtype {dtype} is not supported; declare its kind with "
                      f"overrides={{{column!r}: 'numerical' | 'categorical' | 'datetime' | 'id'}}")


def _integer_valued(series: pd.Series) -> bool:
    values = series.dropna()
    if pd.api.types.is_integer_dtype(series.dtype):
        return True
    if not len(values) or not pd.api.types.is_float_dtype(series.dtype):
        return False
    array = values.to_numpy(dtype=np.float64)
    return bool(np.all(np.isfinite(array)) and np.all(array == np.round(array)))


def _check_id_like(column: str, series: pd.Series, kind: str, max_categories: int) -> None:
    values = series.dropna()
    distinct = values.nunique()
    hint = (f"declare it with overrides={{{column!r}: 'id'}} to generate fresh identifiers, drop the column, "
            f"or declare it {{{column!r}: 'numerical'}}")
    if kind == "categorical" and distinct > max_categories:
        raise SchemaError(f"column {column!r}: {distinct} distinct values (max_categories={max_categories}); "
                          f"it looks like an identifier or free text: {hint}, or raise max_categories")
    if kind == "categorical" and len(values) >= 50 and distinct == len(values) and \
            not pd.api.types.is_bool_dtype(series.dtype):
        raise SchemaError(f"column {column!r}: every one of its {distinct} values is distinct, so it looks like "
                          f"an identifier: {hint}")
    if kind == "numerical" and pd.api.types.is_integer_dtype(series.dtype) and len(values) >= 50 and \
            distinct == len(values) and _ID_NAME.search(str(column)):
        raise SchemaError(f"column {column!r}: integer values, all distinct, and an identifier's name: {hint}")


def _spec(column: str, series: pd.Series, kind: str, max_categories: int) -> ColumnSpec:
    if kind not in KINDS:
        raise SchemaError(f"column {column!r}: unknown kind {kind!r}; expected one of {KINDS}")
    if kind != "id" and series.notna().sum() == 0:
        raise SchemaError(f"column {column!r}: every value is missing; drop it (nothing to learn) or declare it "
                          f"{{{column!r}: 'id'}}")
    spec = ColumnSpec(name=str(column), kind=kind, dtype=str(series.dtype), nullable=bool(series.isna().any()))
    if kind == "categorical":
        _check_id_like(column, series, kind, max_categories)
        spec.categories = _sorted_levels(column, series)
        if isinstance(series.dtype, pd.CategoricalDtype):
            spec.dtype_categories = [_json_scalar(column, c) for c in series.dtype.categories]
            spec.ordered = bool(series.dtype.ordered)
    elif kind == "numerical":
        if not pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
            try:
                pd.to_numeric(series.dropna(), errors="raise")
            except (ValueError, TypeError):
                raise SchemaError(f"column {column!r}: declared numerical but holds non-numeric values "
                                  f"(dtype {series.dtype})") from None
        _check_id_like(column, series, kind, max_categories)
        spec.integer = _integer_valued(pd.to_numeric(series, errors="coerce"))
    elif kind == "datetime":
        if not pd.api.types.is_datetime64_any_dtype(series.dtype):
            raise SchemaError(f"column {column!r}: declared datetime but has dtype {series.dtype}; convert it with "
                              "pd.to_datetime first (so the format is yours, not guessed)")
        tz = getattr(series.dtype, "tz", None)
        spec.tz = str(tz) if tz is not None else None
    return spec


Overrides = Mapping[str, Union[str, Mapping[str, Any]]]


def detect_schema(df: pd.DataFrame, overrides: Optional[Overrides] = None, max_categories: int = 1000) -> list[ColumnSpec]:
    """One :class:`ColumnSpec` per column of ``df``, detected from dtypes; ``overrides`` maps a column
    to a kind (``"categorical"``) or to spec fields (``{"kind": "numerical", "integer": False}``)."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"data: expected a pandas DataFrame, got {type(df).__name__}")
    if df.shape[1] == 0 or df.shape[0] == 0:
        raise ValueError(f"data: expected a non-empty DataFrame, got shape {df.shape}")
    if df.columns.duplicated().any():
        raise ValueError(f"data: duplicated column names {list(df.columns[df.columns.duplicated()])}")
    overrides = dict(overrides or {})
    unknown = [c for c in overrides if c not in df.columns]
    if unknown:
        raise ValueError(f"schema: columns {unknown} are not in the data (columns: {list(df.columns)})")
    specs = []
    for column in df.columns:
        declared = overrides.get(column)
        fields = {"kind": declared} if isinstance(declared, str) else dict(declared or {})
        kind = fields.pop("kind", None) or _detect_kind(column, df[column])
        spec = _spec(column, df[column], kind, max_categories)
        for key, value in fields.items():
            if not hasattr(spec, key) or key in ("name", "dtype"):
                raise SchemaError(f"column {column!r}: unknown schema field {key!r}")
            setattr(spec, key, value)
        specs.append(spec)
    return specs
