"""Backend selection for every diffkern operator.

Four backends implement the same operator contracts:

* ``reference`` - plain torch, written for clarity, fp64-capable: the spec. Always available.
* ``cpu``       - C++ in ``csrc/cpu`` (``diffkern._C``), for CPU tensors.
* ``cuda``      - CUDA kernels in ``csrc/cuda``, for CUDA tensors (Chebyshev family).
* ``triton``    - Triton kernels in ``kernels/``, for CUDA tensors; on CPU tensors only under
  ``TRITON_INTERPRET=1`` (how the tests run them here).

Choice per call: a forced backend (``use_backend(name)`` context, else the ``DIFFKERN_BACKEND``
environment variable) or, by default, the first backend in the device's priority list that
can run the call. A forced backend that cannot run a call raises :class:`BackendError` listing
every reason, as xformers' dispatcher does; nothing silently falls back under a force.

The choice is made inside each operator's custom-op implementation, i.e. at run time, so
``torch.compile`` graphs stay backend-agnostic and a ``use_backend`` context applies to them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
from typing import Callable, Iterator, Optional

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "DIFFKERN_BACKEND"

# Automatic order per device type; an operator only takes the backends it registered.
_PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("diffkern_backend", default=None)


class BackendError(RuntimeError):
    """A requested backend cannot run this call; the message lists why."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


def _triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_importable() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc}); `pip install triton`"
    return True, f"triton {triton.__version__}"


def _status(name: str) -> BackendStatus:
    if name == "reference":
        return BackendStatus(True, "plain torch; always available")
    if name == "cpu":
        ok, why = _extension.load()
        return BackendStatus(ok, why if not ok else f"C++ CPU kernels ({why})")
    if name == "cuda":
        ok, why = _extension.load()
        if not ok:
            return BackendStatus(False, why)
        if not _extension.has_cuda_kernels():
            return BackendStatus(False, "diffkern._C was built without CUDA kernels (CPU-only torch at "
                                        "build time; rebuild with a CUDA torch and FORCE_CUDA=1)")
        if not torch.cuda.is_available():
            return BackendStatus(False, "no CUDA device is visible")
        return BackendStatus(True, "CUDA kernels built and a CUDA device is visible")
    if name == "triton":
        ok, why = _triton_importable()
        if not ok:
            return BackendStatus(False, why)
        if torch.cuda.is_available():
            return BackendStatus(True, f"{why}, native on CUDA tensors")
        if _triton_interpreter_on():
            return BackendStatus(True, f"{why} under TRITON_INTERPRET=1 (CPU tensors, correctness only, slow)")
        return BackendStatus(False, f"{why} installed, but no CUDA device and TRITON_INTERPRET is not 1")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def backends() -> dict[str, BackendStatus]:
    """Map each backend name to ``BackendStatus(available, reason)``."""
    return {name: _status(name) for name in BACKENDS}


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every diffkern operator in this context onto backend ``name`` (None: automatic)."""
    if name is not None:
        _check_name(name, "use_backend")
    token = _forced.set(name)
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or ``DIFFKERN_BACKEND``, or None."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


# A check receives the operator's arguments and returns reasons it cannot run them ([] = ok).
Check = Callable[..., list]


@dataclasses.dataclass
class _Impl:
    fn: Callable
    check: Optional[Check]


class Operator:
    """One operator's backend table: ``op.register("cpu", check=...)(fn)``, then ``op(...)``.

    ``device_of(*args, **kwargs)`` names the tensor whose device drives the choice.
    """

    def __init__(self, name: str, device_of: Callable[..., torch.device]):
        self.name = name
        self.device_of = device_of
        self.impls: dict[str, _Impl] = {}

    def register(self, backend: str, check: Optional[Check] = None):
        _check_name(backend, f"{self.name}.register")

        def wrap(fn):
            self.impls[backend] = _Impl(fn, check)
            return fn
        return wrap

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        """Why ``backend`` cannot run this call (empty list: it can)."""
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        status = _status(backend)
        if not status.available:
            return [status.reason]
        device = self.device_of(*args, **kwargs)
        why = []
        if backend == "cpu" and device.type != "cpu":
            why.append(f"the cpu backend takes CPU tensors, got {device.type}")
        if backend == "cuda" and device.type != "cuda":
            why.append(f"the cuda backend takes CUDA tensors, got {device.type}")
        if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreter_on()):
            why.append(f"the triton backend takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                       f"got {device.type}")
        if not why and impl.check is not None:
            why.extend(impl.check(*args, **kwargs))
        return why

    def select(self, *args, **kwargs) -> str:
        """The backend this call runs on; raises :class:`BackendError` when a forced one cannot."""
        forced = forced_backend()
        if forced is not None:
            why = self.reasons(forced, *args, **kwargs)
            if why:
                raise BackendError(f"diffkern.{self.name}: backend {forced!r} was forced but cannot run "
                                   "this call:\n  - " + "\n  - ".join(why))
            return forced
        device = self.device_of(*args, **kwargs)
        tried = []
        for backend in _PRIORITY.get(device.type, ("reference",)):
            if backend not in self.impls:
                continue
            why = self.reasons(backend, *args, **kwargs)
            if not why:
                return backend
            tried.append(f"{backend}: " + "; ".join(why))
        raise BackendError(f"diffkern.{self.name}: no backend can run this call:\n  - " + "\n  - ".join(tried))

    def __call__(self, *args, **kwargs):
        backend = self.select(*args, **kwargs)
        return self.impls[backend].fn(*args, **kwargs)
