"""Benchmark suites for ``diffkern bench``: one module per operator family.

A suite module defines ``plan(quick: bool, device: str) -> list[harness.CasePlan]`` and is
registered here by one line; ``diffkern bench --suite`` offers exactly the registered names.
Modules are imported only when their suite runs.
"""

from __future__ import annotations

import importlib
from typing import Iterator

SUITES: dict[str, str] = {}


def register_suite(name: str, module: str) -> None:
    """Make ``diffkern bench --suite name`` run ``module.plan``."""
    SUITES[name] = module


register_suite("chebyshev", "diffkern.bench.chebyshev")
register_suite("poe", "diffkern.bench.poe")
register_suite("tabdiff", "diffkern.bench.tabdiff")


def suite_plan(name: str, quick: bool, device: str = "cpu") -> list:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; expected one of {sorted(SUITES)}")
    return list(importlib.import_module(SUITES[name]).plan(quick, device))


def suite_cases(name: str, quick: bool, device: str = "cpu") -> Iterator:
    """The suite's cases, built one at a time (the pytest-benchmark view times them)."""
    for planned in suite_plan(name, quick, device):
        yield planned.build()
