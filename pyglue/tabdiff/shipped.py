"""Models trained by ``scripts/train_tabdiff.py`` and shipped inside the package (no download)."""

from __future__ import annotations

import os

from .synthesizer import TabDiffSynthesizer

SHIPPED = {"adult": "adult.safetensors"}
_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tabdiff")


def shipped_path(name: str, must_exist: bool = True) -> str:
    if name not in SHIPPED:
        raise ValueError(f"name: no shipped TabDiff model {name!r}; available: {sorted(SHIPPED)}")
    path = os.path.join(_FOLDER, SHIPPED[name])
    if must_exist and not os.path.exists(path):
        raise FileNotFoundError(f"the shipped model {name!r} is missing at {path}; rebuild it with "
                                "`python scripts/train_tabdiff.py`")
    return path


def load_shipped(name: str = "adult") -> TabDiffSynthesizer:
    """The fitted synthesizer shipped as ``name`` (``"adult"``: UCI Adult, target ``income``)."""
    return TabDiffSynthesizer.load(shipped_path(name))
