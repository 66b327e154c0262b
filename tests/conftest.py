"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it
is set here, before diffkern.kernels is imported, whenever no CUDA device is visible."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffkern  # noqa: E402
from diffkern import _dispatch  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available(backend: str) -> bool:
    return diffkern.backends()[backend].available


def need(backend: str) -> None:
    """Skip the calling test when ``backend`` cannot run here (and say why)."""
    status = diffkern.backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")


def backends_of(op: str, *, reference: bool = True, exclude=()) -> list:
    """The backends operator ``op`` registers, as pytest parameters (``cuda`` ones marked
    ``cuda``): every backend test takes its list from the registrations, so a new backend is
    tested the day it is registered. ``exclude`` names backends a test leaves out, with a reason
    at the call site (e.g. the Triton interpreter's cost)."""
    names = [b for b in _dispatch.OPERATORS[op].backends if (reference or b != "reference") and b not in exclude]
    return [pytest.param(b, marks=pytest.mark.cuda) if b == "cuda" else b for b in names]


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
