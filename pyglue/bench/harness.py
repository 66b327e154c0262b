"""The benchmark harness behind ``diffkern bench``.

A suite plans :class:`CasePlan` objects (cheap: names only) whose ``build()`` makes a
:class:`Case` (allocates the tensors). Planning first lets the progress bar count the work up
front; building one case at a time keeps only one case's tensors alive.

Each case times several implementations of one operator on one shape and reports, per
implementation: median time (and the repeats' min..max, the row's own noise), speed-up over the
baseline (the reference) and over ``torch.compile`` of it, effective GB/s and the fraction of the
device's limit *measured in the same run* (see :mod:`.devices`), elements/s, and the max error
against the baseline (or the case's ``error_baseline``). A self-timed case (a whole run, once, in
a fresh process) reports its own timing and extra figures (the JSON row's ``details``). Shared
machines drift, so compare ratios within one run, or two runs with ``diffkern bench --compare``
(which judges each row against its repeat spread).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib
import platform
import pkgutil
import time
from typing import Callable, Optional, Sequence

import torch

from .devices import DEVICE_BACKENDS, BenchDevice, Timing, bench_device, stream_read_bandwidth, time_call

COMPILED_PREFIX = "torch.compile"


@dataclasses.dataclass
class Case:
    """One operator on one shape. ``impls`` and ``extra`` map names to zero-argument callables
    returning a tensor or a tuple whose first tensor is compared; ``extra`` rows are reference
    points (e.g. ``torch.exp`` over the same tensor): timed and reported, not error-checked.
    ``skipped`` maps impl names that cannot run here to the reason their row will show.

    The error column compares each output with ``error_baseline``'s (default: the baseline);
    ``no_error`` names the impls whose outputs cannot be compared, with why (their note says it).
    A ``self_timed`` case's impls time themselves (e.g. one whole run in a fresh process): each is
    called once and returns a :class:`Measured`."""

    op: str
    label: str
    impls: dict[str, Callable]
    bytes_moved: int
    elements: int
    baseline: str = "reference"
    compiled: Optional[str] = "torch.compile(reference)"
    extra: dict[str, Callable] = dataclasses.field(default_factory=dict)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    error_baseline: Optional[str] = None
    no_error: dict[str, str] = dataclasses.field(default_factory=dict)
    self_timed: bool = False

    def row_names(self) -> list[str]:
        return list(self.impls) + list(self.extra)


@dataclasses.dataclass
class Measured:
    """What an impl of a ``self_timed`` case returns: its own timing, the output compared with the
    error baseline's (None: no error), a note for its row and ``details`` for the JSON row."""

    timing: Timing
    output: object = None
    note: str = ""
    details: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CasePlan:
    """A case before its tensors exist: ``impls`` names every row it will report, in order."""

    op: str
    label: str
    impls: tuple[str, ...]
    build: Callable[[], Case]


@dataclasses.dataclass
class Row:
    op: str
    label: str
    impl: str
    median_ms: float
    speedup_vs_baseline: Optional[float]
    speedup_vs_compiled: Optional[float]
    gbps: float
    frac_stream_bw: float           # fraction of the device's limit probe (CPU: streaming read)
    elements_per_s: float
    max_rel_err: Optional[float]
    note: str = ""
    device: str = "cpu"
    min_ms: float = float("nan")    # the repeats' spread: what --compare calls this row's noise
    max_ms: float = float("nan")
    repeats: int = 0
    baseline: str = ""              # the impl that speedup_vs_baseline divides by
    details: dict = dataclasses.field(default_factory=dict)   # a self-timed impl's own figures


# ---- which backends a case times ------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _operators() -> dict:
    """Every dispatch table in ``diffkern.ops``, by operator name (read, never modified)."""
    from .. import ops
    from .._dispatch import Operator

    found = {}
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        found.update({v.name: v for v in vars(module).values() if isinstance(v, Operator)})
    return found


def fast_backends(op: str, device: str) -> list[str]:
    """The compiled backends that ``op`` registers for ``device``, whether or not they can run
    here (one that cannot becomes a row saying why, see :func:`unavailable`)."""
    table = _operators()
    if op not in table:
        raise KeyError(f"no operator {op!r} in diffkern.ops; known: {sorted(table)}")
    return [b for b in DEVICE_BACKENDS[device] if b in table[op].impls]


def unavailable(names) -> dict[str, str]:
    """``{backend: why}`` for the backends among ``names`` that cannot run on this machine."""
    from .. import backends

    status = backends()
    return {n: status[n].reason for n in names if not status[n].available}


def with_backends(op: str, device: str, impls: dict, call_on: Callable[[str], Callable]) -> tuple[dict, dict]:
    """``(impls plus one row per compiled backend of op on device, {backend: why it cannot run})``;
    ``call_on(backend)`` makes the zero-argument callable that runs ``op`` on that backend."""
    fast = fast_backends(op, device)
    return {**impls, **{b: call_on(b) for b in fast}}, unavailable(fast)


def compile_lazily(fn: Callable, **options) -> Callable:
    """``torch.compile(fn, **options)``, made on the first call: ``--quick`` never times the
    compiled rows, so it never pays torch.compile's imports (about 200 MB of memory)."""
    compiled: list[Callable] = []

    def call(*args, **kwargs):
        if not compiled:
            compiled.append(torch.compile(fn, **options))
        return compiled[0](*args, **kwargs)
    return call


# ---- timing one case ------------------------------------------------------------------------

def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _max_rel_err(out, ref) -> float:
    a, b = _first_tensor(out).detach().double(), _first_tensor(ref).detach().double()
    if a.shape != b.shape:
        raise RuntimeError(f"shape mismatch against the baseline: {tuple(a.shape)} vs {tuple(b.shape)}")
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    scale = b[finite].abs().max().item() if finite.any() else 1.0
    return (a[finite] - b[finite]).abs().max().item() / max(scale, 1e-30) if finite.any() else 0.0


def _timing_order(case: Case) -> list[str]:
    # the error baseline first: its output is the yardstick of the others' errors
    first = [case.error_baseline or case.baseline, case.baseline]
    return list(dict.fromkeys(first + list(case.impls))) + list(case.extra)


def _time(case: Case, fn: Callable, clock) -> tuple[Timing, object, str, dict]:
    if not case.self_timed:
        return (*time_call(fn, clock), "", {})
    measured = fn()
    return measured.timing, measured.output, measured.note, measured.details


def run_case(case: Case, limit_gbps: float, skip_compiled: bool, progress=None,
             device: Optional[BenchDevice] = None) -> list[Row]:
    device = device or bench_device("cpu")
    timings, errors, notes, details = {}, {}, {}, {}
    yardstick, yardstick_out = case.error_baseline or case.baseline, None
    callables = {**case.impls, **case.extra}
    for name in _timing_order(case):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.label} | {name}"[:80])
        if name in case.skipped:
            notes[name] = f"skipped: {case.skipped[name]}"
        elif skip_compiled and name.startswith(COMPILED_PREFIX):
            notes[name] = "skipped (--quick)"
        else:
            try:
                timings[name], out, notes[name], details[name] = _time(case, callables[name], device.clock)
                if name == yardstick:
                    yardstick_out = out
                if name in case.no_error:
                    notes[name] = "; ".join(filter(None, (notes[name], f"error n/a: {case.no_error[name]}")))
                elif name not in case.extra and yardstick_out is not None and out is not None:
                    errors[name] = _max_rel_err(out, yardstick_out)
                del out
            except Exception as exc:  # report a failing implementation as a row, never hide it
                notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if progress is not None:
            progress.update(1)
    return [_row(case, name, timings, errors.get(name), notes.get(name, ""), limit_gbps, device.name,
                 details.get(name, {})) for name in case.row_names()]


def _row(case: Case, name: str, timings: dict, error, note: str, limit_gbps: float, device: str,
         details: dict) -> Row:
    nan = float("nan")
    t = timings.get(name)
    base = timings.get(case.baseline)
    comp = timings.get(case.compiled) if case.compiled else None
    ratio_ok = t is not None and name not in case.extra
    gbps = case.bytes_moved / t.median_s / 1e9 if t and case.bytes_moved else nan
    return Row(op=case.op, label=case.label, impl=name,
               median_ms=t.median_s * 1e3 if t else nan,
               speedup_vs_baseline=base.median_s / t.median_s if ratio_ok and base else None,
               speedup_vs_compiled=comp.median_s / t.median_s if ratio_ok and comp else None,
               gbps=gbps, frac_stream_bw=gbps / limit_gbps if t else nan,
               elements_per_s=case.elements / t.median_s if t else nan,
               max_rel_err=error, note=note, device=device,
               min_ms=t.min_s * 1e3 if t else nan, max_ms=t.max_s * 1e3 if t else nan,
               repeats=t.repeats if t else 0, baseline=case.baseline, details=details)


def _unrun_rows(plan: CasePlan, note: str, device: str) -> list[Row]:
    nan = float("nan")
    return [Row(plan.op, plan.label, name, nan, None, None, nan, nan, nan, None, note, device)
            for name in plan.impls]


def _build(plan: CasePlan) -> Case:
    case = plan.build()
    if (case.op, case.label, tuple(case.row_names())) != (plan.op, plan.label, plan.impls):
        raise RuntimeError(f"bench suite bug: planned {plan.op} {plan.label} {plan.impls}, built "
                           f"{case.op} {case.label} {tuple(case.row_names())}")
    return case


# ---- a whole run ----------------------------------------------------------------------------

def run(plans: Sequence[CasePlan], *, quick: bool, device: Optional[BenchDevice] = None,
        progress: bool = True, budget_s: Optional[float] = None) -> dict:
    """Run every planned case on ``device``; returns the report dict that ``--json`` writes.
    With ``budget_s``, cases not started within that many seconds are reported as skipped."""
    from tqdm.auto import tqdm

    device = device or bench_device("cpu")
    started = time.perf_counter()
    limit_gbps, probe = device.limit(quick)
    # the CPU keys stay meaningful on a GPU run (consumers of older reports read them)
    stream_gbps, stream_probe = (limit_gbps, probe) if device.name == "cpu" else stream_read_bandwidth(quick)
    # smoothing=0: the ETA averages over the whole run (rows differ in cost by 1000x)
    bar = tqdm(total=sum(len(p.impls) for p in plans), desc="diffkern bench", unit="timing",
               smoothing=0, disable=not progress)
    rows: list[Row] = []
    for index, plan in enumerate(plans, 1):
        bar.set_description(f"diffkern bench, case {index}/{len(plans)}")
        if budget_s is not None and time.perf_counter() - started > budget_s:
            rows += _unrun_rows(plan, f"skipped: time budget of {budget_s:.0f} s spent", device.name)
            bar.update(len(plan.impls))
            continue
        rows += _run_planned(plan, device, quick, bar)
    bar.close()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "stream_read_gbps": stream_gbps, "stream_probe": stream_probe,
                    "device": device.name, "device_name": device.description,
                    "limit_gbps": limit_gbps, "limit_probe": probe, "limit_what": device.limit_what},
        "quick": quick,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def _run_planned(plan: CasePlan, device: BenchDevice, quick: bool, bar) -> list[Row]:
    case = _build(plan)
    # Shared machines drift by tens of percent within minutes: measure the limit around each
    # case (mean of before and after) so the fraction compares like with like.
    before = device.limit(quick)[0]
    case_rows = run_case(case, before, skip_compiled=quick, progress=bar, device=device)
    around = 0.5 * (before + device.limit(quick)[0])
    for row in case_rows:
        row.frac_stream_bw = row.gbps / around
    del case
    gc.collect()
    device.release_memory()
    return case_rows
