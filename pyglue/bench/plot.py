"""The PNG of ``diffkern bench``: one row of panels per operator, horizontal bars.

Left panel: speed-up of each implementation over the case's baseline (log scale). Right panel:
the fraction of the device's limit each one reaches (streaming-read bandwidth on a CPU, a
device-to-device copy on a GPU), measured in the same run - how close to the machine each
implementation gets. The compiled backends (cpu, cuda, triton) are drawn in a strong colour
with bold labels; everything else is a plain-torch baseline.
"""

from __future__ import annotations

import os
from typing import Optional

from .devices import DEVICE_BACKENDS

FAST = {b for names in DEVICE_BACKENDS.values() for b in names}
FAST_COLOUR, COMPILED_COLOUR, PLAIN_COLOUR, EXTRA_COLOUR = "#d95f02", "#7570b3", "#9e9e9e", "#66a61e"
SLOT_INCHES = 0.24        # height of one bar (or case heading) in the figure


def _colour(impl: str, is_extra: bool) -> str:
    if impl in FAST:
        return FAST_COLOUR
    if is_extra:
        return EXTRA_COLOUR
    return COMPILED_COLOUR if impl.startswith("torch.compile") else PLAIN_COLOUR


def _slots(rows: list[dict]) -> list[tuple[str, Optional[dict]]]:
    """Top-to-bottom y slots of one operator: a heading per case, then one slot per row."""
    slots, label = [], None
    for r in rows:
        if r["label"] != label:
            label = r["label"]
            slots.append((label, None))
        slots.append((r["impl"], r))
    return slots


def _by_op(report: dict) -> dict[str, list[dict]]:
    ops: dict[str, list[dict]] = {}
    for r in report["rows"]:
        ops.setdefault(r["op"], []).append(r)
    return ops


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and v == v


def _is_extra(row: dict) -> bool:
    return _finite(row["median_ms"]) and row["speedup_vs_baseline"] is None


def _bars(ax, slots, value_of, text_of):
    for y, (_, row) in enumerate(slots):
        if row is None or not _finite(value_of(row)):
            continue
        ax.barh(y, value_of(row), height=0.72, color=_colour(row["impl"], _is_extra(row)))
        ax.text(value_of(row), y, " " + text_of(row), va="center", fontsize=7)


def _notes(ax, slots):
    """Say in the panel why a row has no bar (skipped, failed, a yardstick without a speed-up)."""
    from matplotlib.transforms import blended_transform_factory

    at_left = blended_transform_factory(ax.transAxes, ax.transData)
    for y, (_, row) in enumerate(slots):
        if row is None or _finite(row["speedup_vs_baseline"]):
            continue
        note = "yardstick: see the % panel" if _is_extra(row) else (row["note"] or "not timed")
        ax.text(0.01, y, note[:70], transform=at_left, va="center", fontsize=6.5, color="#555555", style="italic")


def _times(v: float) -> str:
    return f"{v:.0f}x" if v >= 10 else f"{v:.2g}x"


def _label_axis(ax, slots):
    ax.set_yticks(range(len(slots)))
    ax.set_yticklabels([name if row is not None else name + ":" for name, row in slots], fontsize=7.5)
    for tick, (name, row) in zip(ax.get_yticklabels(), slots):
        if row is None:
            tick.set_fontweight("bold")
            tick.set_fontsize(8)
        elif name in FAST:
            tick.set_fontweight("bold")
            tick.set_color(FAST_COLOUR)
    ax.set_ylim(len(slots) - 0.4, -0.6)          # first case at the top


def _speedup_panel(ax, op: str, rows: list[dict], slots) -> None:
    speedups = [r["speedup_vs_baseline"] for r in rows if _finite(r["speedup_vs_baseline"])]
    _bars(ax, slots, lambda r: r["speedup_vs_baseline"], lambda r: _times(r["speedup_vs_baseline"]))
    _notes(ax, slots)
    ax.set_xscale("log")
    if speedups:
        ax.set_xlim(min(0.5, min(speedups) / 1.5), max(speedups) * 4)
    ax.axvline(1.0, color="k", lw=0.8)
    baseline = next((r["baseline"] for r in rows if r.get("baseline")), "the baseline")
    ax.set_title(f"{op}: speed-up over {baseline} (log)", fontsize=9, loc="left")
    _label_axis(ax, slots)


def _limit_panel(ax, limit_name: str, rows: list[dict], slots) -> None:
    fractions = [r["frac_stream_bw"] * 100 for r in rows if _finite(r["frac_stream_bw"])]
    _bars(ax, slots, lambda r: r["frac_stream_bw"] * 100, lambda r: f"{r['frac_stream_bw'] * 100:.0f}%")
    ax.set_xlim(0, max([110.0] + fractions) * 1.15)
    ax.axvline(100.0, color="k", lw=0.8, ls="--")
    ax.set_title(f"% of {limit_name}", fontsize=9, loc="left")
    ax.tick_params(axis="y", left=False, labelleft=False)


def build_figure(report: dict):
    """The matplotlib figure: two panels (speed-up, % of limit) per operator."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    machine = report["machine"]
    ops = _by_op(report)
    slots = {op: _slots(rows) for op, rows in ops.items()}
    heights = [len(s) + 2.5 for s in slots.values()]
    fig, axes = plt.subplots(len(ops), 2, figsize=(13, SLOT_INCHES * sum(heights) + 1.2), squeeze=False,
                             gridspec_kw={"height_ratios": heights, "width_ratios": [1.25, 1]})
    limit_name = f"{machine.get('limit_what', 'streaming-read bandwidth')} (probe, this run)"
    for (op, rows), (left, right) in zip(ops.items(), axes):
        _speedup_panel(left, op, rows, slots[op])
        right.sharey(left)
        _limit_panel(right, limit_name, rows, slots[op])
    limit_gbps = machine.get("limit_gbps", machine["stream_read_gbps"])
    fig.suptitle(f"diffkern bench{' --quick' if report.get('quick') else ''}: "
                 f"{machine.get('device_name', 'CPU')}, {machine['threads']} CPU threads, torch {machine['torch']}; "
                 f"limit {limit_gbps:.1f} GB/s", fontsize=10)
    legend = [Patch(color=FAST_COLOUR, label="diffkern compiled backend"),
              Patch(color=COMPILED_COLOUR, label="torch.compile of a baseline"),
              Patch(color=PLAIN_COLOUR, label="plain torch"),
              Patch(color=EXTRA_COLOUR, label="yardstick (not the op)")]
    fig.legend(handles=legend, loc="upper right", fontsize=7.5, ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return fig


def write_plot(report: dict, path: str) -> Optional[str]:
    """Write the PNG; returns None, or one line saying why no plot was written."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "matplotlib is not installed; no plot written (pip install matplotlib)"
    if not any(_finite(r["median_ms"]) for r in report["rows"]):
        return "no timed rows to plot"
    import matplotlib.pyplot as plt

    fig = build_figure(report)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
