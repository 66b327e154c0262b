"""Optional dependencies of the methods and tools: import them by name, and when one is missing
say in one line which extra installs it (``pip install "diffkern[poe]"``) instead of ending in a
raw ``ModuleNotFoundError`` traceback. The ``diffkern`` command prints the line and exits."""

from __future__ import annotations

import importlib

# top-level module -> (pip package, diffkern extra that installs it; see pyproject.toml)
EXTRAS = {
    "transformers": ("transformers", "poe"),
    "diffusers": ("diffusers", "spectrum"),
    "sklearn": ("scikit-learn", "spectrum"),
    "matplotlib": ("matplotlib", "bench"),
    "triton": ("triton", "triton"),
    "pandas": ("pandas<3", "tabdiff"),
    "safetensors": ("safetensors", "tabdiff"),
    "sdmetrics": ("sdmetrics==0.32.0", "eval"),
    "xgboost": ("xgboost-cpu (the CPU build; plain xgboost pulls a 351 MB NCCL wheel)", "eval"),
    "sdv": ("sdv==2.0.0 (BUSL-1.1 licensed: an optional extra, for comparisons only)", "sdv"),
}


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, needed_by: str):
    """Import ``module`` (e.g. ``"transformers"`` or ``"sklearn.datasets"``) for ``needed_by``;
    raise :class:`MissingDependency` if its package is not installed. Errors raised *inside* an
    installed package propagate unchanged."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] != top or top not in EXTRAS:
            raise
        package, extra = EXTRAS[top]
        raise MissingDependency(f'{needed_by} needs {package}, which is not installed: '
                                f'pip install "diffkern[{extra}]"') from exc
