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

Declaring an operator's backends
--------------------------------
An :class:`Operator` is a backend table. A registration *declares* what its backend needs; the
dispatcher turns every unmet need into a reason (xformers' ``not_supported_reasons``), so an
operator file holds declarations, not check closures::

    _step_op = Operator("tabdiff_step", device_of="x_num")     # the argument whose device decides
    _step_op.register("reference")(step_reference)              # needs nothing: runs anywhere
    _step_op.register("cpu", compiled="tabdiff_step_kernel",    # a torch.ops.diffkern op of _C
                      dtypes={"x_num": FAST_DTYPES},            # argument -> dtypes it takes
                      finish=_finish_step)(_step_cpu)           # the family's epilogue (below)
    _step_op.register("triton", "diffkern.kernels.tabdiff:tabdiff_step",   # imported on first use
                      dtypes={"x_num": FAST_DTYPES}, finish=_finish_step)
    out = _step_op(x_num, ...)                                  # select, run, finish

* Arguments are named as in the ``reference`` implementation's signature (the spec); a list
  argument's dtype need applies to every element.
* The device rules are the backend's: ``cpu`` takes CPU tensors, ``cuda`` CUDA tensors,
  ``triton`` CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``); ``reference`` any.
* A kernel given as ``"module:function"`` is imported on first use; an import failure is a
  reason, not an exception.
* ``finish(raw, *args, **kwargs)`` turns a fast backend's raw output (e.g. status counters and
  partial results) into the operator's result, so every fast backend of a family shares one
  error and epilogue path.
* ``check=fn(*args, **kwargs) -> [reasons]`` remains for a need no declaration can express.

The spelling ``op = Operator(name, device_of_fn); op.register("reference")(fn); op(...)`` is the
minimal case and keeps working.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import inspect
import os
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "DIFFKERN_BACKEND"

# Automatic order per device type; an operator only takes the backends it registered.
_PRIORITY = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("diffkern_backend", default=None)

OPERATORS: dict[str, "Operator"] = {}   # every Operator by name (tests derive their backends here)


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


def has_compiled(name: str) -> bool:
    """``torch.ops.diffkern.<name>`` exists (``diffkern._C`` loaded and built with it)."""
    return _extension.load()[0] and hasattr(torch.ops.diffkern, name)


# ---- what a backend needs from a call: devices, compiled ops, kernel modules, dtypes ----------

def _device_reasons(backend: str, device: torch.device) -> list[str]:
    if backend == "cpu" and device.type != "cpu":
        return [f"the cpu backend takes CPU tensors, got {device.type}"]
    if backend == "cuda" and device.type != "cuda":
        return [f"the cuda backend takes CUDA tensors, got {device.type}"]
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and _triton_interpreter_on()):
        return [f"the triton backend takes CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), "
                f"got {device.type}"]
    return []


@functools.lru_cache(maxsize=None)
def _import(module: str):
    """``(module, None)`` or ``(None, reason)``; imported once."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"{module} failed to import ({exc})"


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _dtype_reason(arg: str, value, allowed: Sequence[torch.dtype]) -> Optional[str]:
    """Why ``value`` (a tensor, or a list of tensors) has a dtype the backend does not take."""
    items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, t in items:
        if isinstance(t, torch.Tensor) and t.dtype not in allowed:
            name = arg if i is None else f"{arg}[{i}]"
            return f"{name} dtype {t.dtype} is not supported ({_dtype_names(allowed)})"
    return None


Check = Callable[..., list]   # receives the operator's arguments; returns reasons ([] = can run)


@dataclasses.dataclass
class _Impl:
    """One backend of an operator: its function (or ``"module:function"``) and its declared needs."""

    fn: Union[Callable, str]
    check: Optional[Check] = None
    dtypes: Mapping[str, Sequence[torch.dtype]] = dataclasses.field(default_factory=dict)
    compiled: Optional[str] = None
    finish: Optional[Callable] = None

    @property
    def module(self) -> Optional[str]:
        return self.fn.partition(":")[0] if isinstance(self.fn, str) else None

    def resolve(self) -> Callable:
        if not isinstance(self.fn, str):
            return self.fn
        mod, why = _import(self.module)
        if mod is None:
            raise BackendError(why)
        return getattr(mod, self.fn.partition(":")[2])


class Operator:
    """One operator's backend table: ``op.register(backend, ...)(fn)``, then ``op(...)``.

    ``device_of`` names the argument whose device drives the choice (a list argument: its first
    tensor), or is a function ``device_of(*args, **kwargs) -> torch.device``.
    """

    def __init__(self, name: str, device_of: Union[str, Callable[..., torch.device]]):
        self.name = name
        self.device_of = self._device_getter(device_of) if isinstance(device_of, str) else device_of
        self.impls: dict[str, _Impl] = {}
        self._params: Optional[list[str]] = None   # argument names, from the reference's signature
        OPERATORS[name] = self

    # ---- declaration ---------------------------------------------------------------------
    def register(self, backend: str, fn: Union[Callable, str, None] = None, *, check: Optional[Check] = None,
                 dtypes: Optional[Mapping[str, Sequence[torch.dtype]]] = None, compiled: Optional[str] = None,
                 finish: Optional[Callable] = None):
        """Register ``fn`` as ``backend`` with its needs; without ``fn``, a decorator."""
        _check_name(backend, f"{self.name}.register")

        def wrap(f):
            self.impls[backend] = _Impl(f, check, dict(dtypes or {}), compiled, finish)
            if callable(f) and (backend == "reference" or self._params is None):
                self._params = list(inspect.signature(f).parameters)   # the spec names the arguments
            return f
        return wrap if fn is None else wrap(fn)

    @property
    def backends(self) -> tuple[str, ...]:
        """The registered backends, in :data:`BACKENDS` order."""
        return tuple(b for b in BACKENDS if b in self.impls)

    # ---- arguments by name -----------------------------------------------------------------
    def _arg(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        return args[self._params.index(name)]

    def _device_getter(self, arg: str) -> Callable[..., torch.device]:
        def device_of(*args, **kwargs) -> torch.device:
            value = self._arg(arg, args, kwargs)
            return (value[0] if isinstance(value, (list, tuple)) else value).device
        return device_of

    # ---- reasons, selection, call ------------------------------------------------------------
    def _needs_reasons(self, impl: _Impl, args: tuple, kwargs: dict) -> list[str]:
        if impl.compiled is not None and not has_compiled(impl.compiled):
            return [f"diffkern._C has no {impl.compiled} (rebuild the extension)"]
        if impl.module is not None:
            why = _import(impl.module)[1]
            if why is not None:
                return [why]
        why = (_dtype_reason(arg, self._arg(arg, args, kwargs), allowed) for arg, allowed in impl.dtypes.items())
        return [w for w in why if w is not None]

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        """Why ``backend`` cannot run this call (empty list: it can)."""
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        status = _status(backend)
        if not status.available:
            return [status.reason]
        why = _device_reasons(backend, self.device_of(*args, **kwargs))
        if not why:
            why = self._needs_reasons(impl, args, kwargs)
        if not why and impl.check is not None:
            why = list(impl.check(*args, **kwargs))
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
        impl = self.impls[self.select(*args, **kwargs)]
        out = impl.resolve()(*args, **kwargs)
        return out if impl.finish is None else impl.finish(out, *args, **kwargs)
