"""Loads the compiled extension ``diffkern._C`` once, and remembers why it could not be.

``_C`` is a plain shared library that registers ``torch.ops.diffkern.*`` through
``TORCH_LIBRARY``; it has no Python module init, so it is loaded with
``torch.ops.load_library`` rather than imported.
"""

from __future__ import annotations

import functools
import glob
import os

import torch


@functools.lru_cache(maxsize=None)
def load() -> tuple[bool, str]:
    """Return ``(loaded, reason)``; ``reason`` explains a failure in one sentence."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd")))
    if not candidates:
        return False, ("diffkern was installed without its C++ extension (DIFFKERN_NO_EXT=1, or torch "
                       "was not importable at build time); rebuild with "
                       "`pip install --no-build-isolation .`")
    try:
        torch.ops.load_library(candidates[0])
    except OSError as exc:  # e.g. built against another torch version
        return False, f"diffkern._C failed to load ({exc}); rebuild it against torch {torch.__version__}"
    return True, f"loaded {os.path.basename(candidates[0])}"


def has_cuda_kernels() -> bool:
    """True if ``_C`` was compiled with ``csrc/cuda`` (a CUDA build of torch was used)."""
    return bool(_build_flags().get("cuda"))


@functools.lru_cache(maxsize=None)
def _build_flags() -> dict:
    ok, _ = load()
    if not ok:
        return {}
    flags = {}
    for item in torch.ops.diffkern.build_info().split(";"):
        key, _, value = item.partition("=")
        flags[key.strip()] = value.strip()
    flags["cuda"] = flags.get("cuda") == "1"
    return flags


def build_info() -> dict:
    """What ``_C`` was compiled with: compiler, torch version, OpenMP, CUDA."""
    return dict(_build_flags())
