"""Test-wide setup, including how the Triton tests run, chosen by ``DIFFKERN_TRITON_TESTS``:

* ``interpret`` (default without a CUDA device): ``TRITON_INTERPRET=1``, kernels on CPU tensors
  (correctness only). It must be set before any ``@triton.jit`` decorator runs, so it is set
  here, before diffkern.kernels is imported.
* ``native`` (default with a CUDA device; scripts/gpu_check.sh asks for it): compiled kernels
  on CUDA tensors, ``TRITON_INTERPRET=0``; refuses to start without a CUDA device.

Tests build their inputs on the CPU; :func:`triton_call` / :func:`on_triton_device` move them to
``TRITON_DEVICE`` (strides kept, so stride-0 and transposed inputs stay what they were)."""

import os

import torch

TRITON_MODES = ("interpret", "native")
TRITON_MODE = os.environ.get("DIFFKERN_TRITON_TESTS") or ("native" if torch.cuda.is_available() else "interpret")
if TRITON_MODE == "native":
    os.environ["TRITON_INTERPRET"] = "0"
elif TRITON_MODE == "interpret":
    os.environ.setdefault("TRITON_INTERPRET", "1")
TRITON_DEVICE = "cuda" if TRITON_MODE == "native" else "cpu"

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
def _to_device_keeping_strides(t: torch.Tensor, device: str) -> torch.Tensor:
    """``t`` on ``device`` with the same sizes and strides: the storage span it views is moved,
    then viewed the same way (``t.to(device)`` would make stride-0 inputs dense)."""
    if t.device.type == torch.device(device).type or t.numel() == 0 or any(s < 0 for s in t.stride()):
        return t.to(device)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = t.as_strided((span,), (1,), t.storage_offset()).to(device)
    return flat.as_strided(t.shape, t.stride(), 0)


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):           # NamedTuple results
        return type(tree)(*(_map_tensors(x, fn) for x in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(x, fn) for x in tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(v, fn) for k, v in tree.items()}
    return tree


def on_triton_device(tree):
    """The tensors in ``tree`` (nested tuples, lists, dicts) on ``TRITON_DEVICE``."""
    return _map_tensors(tree, lambda t: _to_device_keeping_strides(t, TRITON_DEVICE))


def triton_call(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with its tensors on ``TRITON_DEVICE``; the result back on the CPU."""
    out = fn(*on_triton_device(args), **on_triton_device(kwargs))
    return _map_tensors(out, lambda t: t.cpu())


def pytest_configure(config):
    if TRITON_MODE not in TRITON_MODES:
        raise pytest.UsageError(f"DIFFKERN_TRITON_TESTS={TRITON_MODE!r}: expected one of {TRITON_MODES}")
    if TRITON_MODE == "native" and not torch.cuda.is_available():
        raise pytest.UsageError("DIFFKERN_TRITON_TESTS=native runs the Triton kernels on a CUDA device, "
                                "and none is visible")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
