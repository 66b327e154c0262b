"""The benchmark harness behind ``diffkern bench``.

A suite yields :class:`Case` objects; each case times several implementations of one operator on
one shape and reports, per implementation: median time, speed-up over the baseline (the
reference) and over ``torch.compile`` of it, effective GB/s and the fraction of this machine's
streaming-read bandwidth *measured in the same run*, elements/s, and the max error against the
baseline. Shared machines drift, so compare ratios within one run, never absolute times.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import statistics
import time
from typing import Callable, Iterable, Iterator, Optional

import torch

COMPILED_PREFIX = "torch.compile"


@dataclasses.dataclass
class Case:
    """One operator on one shape. ``impls`` and ``extra`` map names to zero-argument callables
    returning a tensor or a tuple whose first tensor is compared; ``extra`` rows are reference
    points (e.g. ``torch.exp`` over the same tensor): timed and reported, not error-checked."""

    op: str
    label: str
    impls: dict[str, Callable]
    bytes_moved: int
    elements: int
    baseline: str = "reference"
    compiled: Optional[str] = "torch.compile(reference)"
    extra: dict[str, Callable] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Row:
    op: str
    label: str
    impl: str
    median_ms: float
    speedup_vs_baseline: Optional[float]
    speedup_vs_compiled: Optional[float]
    gbps: float
    frac_stream_bw: float
    elements_per_s: float
    max_rel_err: Optional[float]
    note: str = ""


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def time_call(fn: Callable, *, min_repeats: int = 3, max_repeats: int = 15, budget_s: float = 3.0):
    """``(median seconds per call, output of the warm-up call)``. The warm-up also absorbs
    compilation; calls slower than 5 s are timed twice rather than ``min_repeats`` times."""
    t0 = time.perf_counter()
    out = fn()
    if time.perf_counter() - t0 > 5.0:
        min_repeats = min(min_repeats, 2)
    times = []
    start = time.perf_counter()
    while len(times) < max_repeats and (len(times) < min_repeats or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def stream_read_bandwidth(quick: bool) -> tuple[float, str]:
    """This machine's streaming-read bandwidth in GB/s: the best of diffkern's C++ read probe
    (if built) and ``torch.sum`` over a buffer far larger than the caches."""
    buf = torch.ones((64 if quick else 256) * 2**20 // 4)
    probes = {"torch.sum": lambda: buf.sum()}
    if hasattr(torch.ops, "diffkern") and _has_probe():
        probes["diffkern.stream_read_probe"] = lambda: torch.ops.diffkern.stream_read_probe(buf)
    results = {name: buf.numel() * 4 / time_call(fn, min_repeats=5)[0] / 1e9 for name, fn in probes.items()}
    best = max(results, key=results.get)
    return results[best], best


def _has_probe() -> bool:
    from .. import _extension
    return _extension.load()[0]


def _max_rel_err(out, ref) -> float:
    a, b = _first_tensor(out).detach().double(), _first_tensor(ref).detach().double()
    if a.shape != b.shape:
        raise RuntimeError(f"shape mismatch against the baseline: {tuple(a.shape)} vs {tuple(b.shape)}")
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    scale = b[finite].abs().max().item() if finite.any() else 1.0
    return (a[finite] - b[finite]).abs().max().item() / max(scale, 1e-30) if finite.any() else 0.0


def run_case(case: Case, stream_gbps: float, skip_compiled: bool, progress=None) -> list[Row]:
    timings: dict[str, float] = {}
    errors: dict[str, Optional[float]] = {}
    notes: dict[str, str] = {}
    baseline_out = None
    order = [case.baseline] + [n for n in case.impls if n != case.baseline]  # baseline first: its output is the yardstick
    for name, fn in [(n, case.impls[n]) for n in order] + list(case.extra.items()):
        if progress is not None:
            progress.set_postfix_str(f"{case.op} {case.label} {name}"[:70])
        if skip_compiled and name.startswith(COMPILED_PREFIX):
            notes[name] = "skipped (--quick)"
            continue
        try:
            timings[name], out = time_call(fn)
            if name == case.baseline:
                baseline_out = out
            if name not in case.extra and baseline_out is not None:
                errors[name] = _max_rel_err(out, baseline_out)
        except Exception as exc:  # report a failing implementation as a row, never hide it
            notes[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if progress is not None:
            progress.update(1)
    rows = []
    base_t = timings.get(case.baseline)
    comp_t = timings.get(case.compiled) if case.compiled else None
    for name in list(case.impls) + list(case.extra):
        t = timings.get(name)
        gbps = case.bytes_moved / t / 1e9 if t else float("nan")
        rows.append(Row(
            op=case.op, label=case.label, impl=name,
            median_ms=t * 1e3 if t else float("nan"),
            speedup_vs_baseline=base_t / t if t and base_t and name not in case.extra else None,
            speedup_vs_compiled=comp_t / t if t and comp_t and name not in case.extra else None,
            gbps=gbps, frac_stream_bw=gbps / stream_gbps if t else float("nan"),
            elements_per_s=case.elements / t if t else float("nan"),
            max_rel_err=errors.get(name), note=notes.get(name, "")))
    return rows


def run(cases: Iterable[Case], *, quick: bool, progress: bool = True) -> dict:
    """Run every case; returns the report dict that ``--json`` writes."""
    from tqdm.auto import tqdm

    stream_gbps, probe = stream_read_bandwidth(quick)
    bar = tqdm(desc="diffkern bench", unit="impl", disable=not progress)
    rows: list[Row] = []
    for case in cases:
        # Shared machines drift by tens of percent within minutes: measure the ceiling around
        # each case (mean of before and after) so "% stream" compares like with like.
        before = stream_read_bandwidth(quick)[0]
        case_rows = run_case(case, before, skip_compiled=quick, progress=bar)
        around = 0.5 * (before + stream_read_bandwidth(quick)[0])
        for row in case_rows:
            row.frac_stream_bw = row.gbps / around
        rows.extend(case_rows)
        del case
        gc.collect()
    bar.close()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "stream_read_gbps": stream_gbps, "stream_probe": probe},
        "quick": quick,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


# ---- presentation ------------------------------------------------------------------------

def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return none
    return format(value, spec)


def format_table(report: dict) -> str:
    m = report["machine"]
    header = (f"streaming-read bandwidth at start ({m['stream_probe']}): {m['stream_read_gbps']:.1f} GB/s; "
              "'% stream' uses the probe re-measured around each case; "
              f"{m['threads']} threads, torch {m['torch']}")
    cols = ("op", "shape", "impl", "median ms", "x ref", "x compile", "GB/s", "% stream", "elem/s", "max rel err")
    lines = []
    for r in report["rows"]:
        lines.append((r["op"], r["label"], r["impl"] + (f" [{r['note']}]" if r["note"] else ""),
                      _fmt(r["median_ms"], ".2f"), _fmt(r["speedup_vs_baseline"], ".2f"),
                      _fmt(r["speedup_vs_compiled"], ".2f"), _fmt(r["gbps"], ".1f"),
                      _fmt(r["frac_stream_bw"] * 100 if r["frac_stream_bw"] == r["frac_stream_bw"] else None, ".0f"),
                      _fmt(r["elements_per_s"], ".3g"), _fmt(r["max_rel_err"], ".1e")))
    widths = [max(len(c), *(len(l[i]) for l in lines)) if lines else len(c) for i, c in enumerate(cols)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [header, fmt_line(cols), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(l) for l in lines]
    return "\n".join(out)


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def write_plot(report: dict, path: str) -> Optional[str]:
    """Bar chart of speed-up over the reference per case; returns None if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; no plot written (pip install matplotlib)"
    cases: dict[str, dict[str, float]] = {}
    for r in report["rows"]:
        if r["speedup_vs_baseline"]:
            cases.setdefault(f"{r['op']}\n{r['label']}", {})[r["impl"]] = r["speedup_vs_baseline"]
    if not cases:
        return "no timed rows to plot"
    impls = sorted({i for c in cases.values() for i in c})
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cases)), 5))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        xs = [i + j * width for i in range(len(cases))]
        ax.bar(xs, [c.get(impl, 0.0) for c in cases.values()], width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(list(cases), fontsize=7)
    ax.set_yscale("log")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("speed-up over reference (log)")
    ax.set_title(f"diffkern bench ({report['machine']['threads']} threads; "
                 f"stream read {report['machine']['stream_read_gbps']:.1f} GB/s)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def chain(*generators: Iterable[Case]) -> Iterator[Case]:
    for g in generators:
        yield from g
