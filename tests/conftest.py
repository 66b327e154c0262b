"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it
is set here, before diffkern.kernels is imported, whenever no CUDA device is visible."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import diffkern  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available(backend: str) -> bool:
    return diffkern.backends()[backend].available


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
