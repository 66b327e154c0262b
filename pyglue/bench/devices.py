"""Where ``diffkern bench`` runs: one :class:`BenchDevice` per device type, each with a clock that
times its work correctly and a probe of the device's own bandwidth limit.

* ``cpu``  - work is synchronous, so the host's wall clock times it; the limit is the
  streaming-read bandwidth (best of ``torch.sum`` and diffkern's C++ read loop).
* ``cuda`` - kernels run asynchronously: a host clock would time the launch, not the work. CUDA
  events recorded on the stream around each call, read after a synchronize, time the work (as
  ``triton.testing.do_bench`` does, L2 flushed between calls). The limit is a device-to-device
  copy (read + write), measured in the same run as the rows.

Which backends a device takes is :data:`DEVICE_BACKENDS`; cases add the reference and
``torch.compile`` of it (plain torch, any device) themselves.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Callable, Optional

import torch

# The compiled backends timed on each device (the Triton interpreter on CPU measures nothing).
DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


class DeviceUnavailable(RuntimeError):
    """The requested bench device cannot run here; the message is one line saying why."""


# ---- clocks -------------------------------------------------------------------------------

class WallClock:
    """Host time around a synchronous call (CPU work)."""

    max_repeats = 15

    def synchronize(self) -> None:
        pass

    def seconds(self, fn: Callable) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class EventClock:
    """Device time between two events recorded around the call on an asynchronous device.

    ``new_event()`` returns an object with ``record()``, ``synchronize()`` and
    ``elapsed_time(end)`` in milliseconds (``torch.cuda.Event`` does); ``synchronize()`` waits
    for all queued work; ``flush()``, if given, runs before each timed call (L2 eviction).
    Tests pass a fake device through these hooks.
    """

    max_repeats = 100   # device calls are short: more repeats, same time budget

    def __init__(self, new_event: Callable, synchronize: Callable[[], None],
                 flush: Optional[Callable[[], None]] = None):
        self.new_event, self.synchronize, self.flush = new_event, synchronize, flush

    def seconds(self, fn: Callable) -> float:
        if self.flush is not None:
            self.flush()
        start, end = self.new_event(), self.new_event()
        start.record()
        fn()
        end.record()
        end.synchronize()   # the host waits for the device before reading the events
        return start.elapsed_time(end) / 1e3

    @classmethod
    def cuda(cls) -> "EventClock":
        l2 = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")   # > any GPU's L2
        return cls(new_event=lambda: torch.cuda.Event(enable_timing=True),
                   synchronize=torch.cuda.synchronize, flush=l2.zero_)


@dataclasses.dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def time_call(fn: Callable, clock=None, *, min_repeats: int = 3, max_repeats: Optional[int] = None,
              budget_s: float = 3.0) -> tuple[Timing, object]:
    """``(Timing of the repeats, output of the warm-up call)``. The warm-up absorbs compilation
    (and is synchronised, so its queued work is not timed); calls slower than 5 s are timed
    twice rather than ``min_repeats`` times. The repeats' min..max is the row's own noise."""
    clock = clock or WallClock()
    max_repeats = max_repeats or clock.max_repeats
    t0 = time.perf_counter()
    out = fn()
    clock.synchronize()
    if time.perf_counter() - t0 > 5.0:
        min_repeats = min(min_repeats, 2)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        times.append(clock.seconds(fn))
    return Timing(statistics.median(times), min(times), max(times), len(times)), out


# ---- limit probes -------------------------------------------------------------------------

def _has_read_probe() -> bool:
    from .. import _extension
    return _extension.load()[0] and hasattr(torch.ops.diffkern, "stream_read_probe")


def stream_read_bandwidth(quick: bool) -> tuple[float, str]:
    """This machine's streaming-read bandwidth in GB/s: the best of diffkern's C++ read probe
    (if built) and ``torch.sum`` over a buffer far larger than the caches."""
    buf = torch.ones((64 if quick else 256) * 2**20 // 4)
    probes = {"torch.sum": lambda: buf.sum()}
    if _has_read_probe():
        probes["diffkern.stream_read_probe"] = lambda: torch.ops.diffkern.stream_read_probe(buf)
    results = {name: buf.numel() * 4 / time_call(fn, min_repeats=5)[0].median_s / 1e9
               for name, fn in probes.items()}
    best = max(results, key=results.get)
    return results[best], best


def copy_bandwidth(clock, device: str, quick: bool) -> tuple[float, str]:
    """Device-to-device copy bandwidth in GB/s, counting the bytes read and written."""
    nbytes = (256 if quick else 1024) * 2**20
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    timing, _ = time_call(lambda: dst.copy_(src), clock, min_repeats=5)
    return 2 * nbytes / timing.median_s / 1e9, "device-to-device copy"


# ---- devices ------------------------------------------------------------------------------

@dataclasses.dataclass
class BenchDevice:
    name: str                                   # torch device type: "cpu" or "cuda"
    description: str                            # what the JSON and table header say it is
    clock: object                               # WallClock or EventClock
    limit: Callable[[bool], tuple[float, str]]  # quick -> (GB/s, probe name)
    limit_what: str                             # the limit in words

    def release_memory(self) -> None:
        if self.name == "cuda":
            torch.cuda.empty_cache()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def _cpu() -> BenchDevice:
    return BenchDevice("cpu", _cpu_model(), WallClock(), stream_read_bandwidth, "streaming-read bandwidth")


def _cuda() -> BenchDevice:
    if not torch.cuda.is_available():
        why = ("this torch has no CUDA support" if not torch.version.cuda
               else f"no CUDA device is visible to torch {torch.__version__}")
        raise DeviceUnavailable(f"--device cuda: {why}; the CUDA path cannot run on this machine")
    clock = EventClock.cuda()
    return BenchDevice("cuda", torch.cuda.get_device_name(), clock,
                       lambda quick: copy_bandwidth(clock, "cuda", quick),
                       "device-to-device copy bandwidth (read + write)")


DEVICES = {"cpu": _cpu, "cuda": _cuda}


def bench_device(name: str) -> BenchDevice:
    """The bench device called ``name``; raises :class:`DeviceUnavailable` when it cannot run here."""
    if name not in DEVICES:
        raise DeviceUnavailable(f"--device {name}: expected one of {sorted(DEVICES)}")
    return DEVICES[name]()
