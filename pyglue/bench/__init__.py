"""Benchmark suites for ``diffkern bench``: each module yields :class:`harness.Case` objects."""

import importlib

SUITES = {"chebyshev": "diffkern.bench.chebyshev", "poe": "diffkern.bench.poe"}


def suite_cases(name: str, quick: bool):
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return importlib.import_module(SUITES[name]).cases(quick)
