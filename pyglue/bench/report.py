"""What ``diffkern bench`` prints and writes: the table and the JSON report."""

from __future__ import annotations

import json
import os

# Title of the column holding each row's fraction of the device's limit probe.
LIMIT_COLUMN = {"cpu": "% stream", "cuda": "% copy"}


def _fmt(value, spec: str, none: str = "-") -> str:
    if value is None or (isinstance(value, float) and value != value):
        return none
    return format(value, spec)


def _header(machine: dict) -> str:
    device = machine.get("device", "cpu")
    column = LIMIT_COLUMN.get(device, "% limit")
    if device == "cpu":
        limit = (f"streaming-read bandwidth at start ({machine['stream_probe']}): "
                 f"{machine['stream_read_gbps']:.1f} GB/s")
    else:
        limit = (f"{machine['device_name']}: {machine['limit_what']} at start: "
                 f"{machine['limit_gbps']:.1f} GB/s")
    return (f"{limit}; '{column}' uses the probe re-measured around each case; "
            f"{machine['threads']} threads, torch {machine['torch']}")


def format_table(report: dict) -> str:
    machine = report["machine"]
    column = LIMIT_COLUMN.get(machine.get("device", "cpu"), "% limit")
    cols = ("op", "shape", "impl", "median ms", "x ref", "x compile", "GB/s", column, "elem/s", "max rel err")
    lines = []
    for r in report["rows"]:
        frac = r["frac_stream_bw"]
        lines.append((r["op"], r["label"], r["impl"] + (f" [{r['note']}]" if r["note"] else ""),
                      _fmt(r["median_ms"], ".2f"), _fmt(r["speedup_vs_baseline"], ".2f"),
                      _fmt(r["speedup_vs_compiled"], ".2f"), _fmt(r["gbps"], ".1f"),
                      _fmt(frac * 100 if frac == frac else None, ".0f"),
                      _fmt(r["elements_per_s"], ".3g"), _fmt(r["max_rel_err"], ".1e")))
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = [_header(machine), fmt_line(cols), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(line) for line in lines]
    split = _sample_split_table(report["rows"])
    return "\n".join(out + ([""] + split if split else []))


def _sample_split_table(rows: list) -> list[str]:
    """Rows that timed a whole sample() (``details["sample"]``): wall time split and peak memory."""
    timed = [r for r in rows if (r.get("details") or {}).get("sample")]
    if not timed:
        return []
    cols = ("op", "impl", "rows", "steps", "wall s", "network %", "step ops %", "rest %", "peak RSS MB",
            "grew MB")
    lines = []
    for r in timed:
        s = r["details"]["sample"]
        p = s["percent"]
        lines.append((r["op"], r["impl"], str(s["rows"]), str(s["steps"]), _fmt(s["wall_s"], ".1f"),
                      _fmt(p["network"], ".1f"), _fmt(p["step ops"], ".1f"), _fmt(p["rest"], ".1f"),
                      _fmt(s["peak_rss_mb"], ".0f"), _fmt(s["rss_growth_mb"], ".0f")))
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    title = ("whole sample(), one run per backend in a fresh process: wall time split into the network, "
             "the tabdiff_* step operators and the rest; peak RSS of that process (grew: during the timed sample)")
    return [title, fmt_line(cols), fmt_line(["-" * w for w in widths])] + [fmt_line(line) for line in lines]


def write_json(report: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def read_json(path: str) -> dict:
    """A report written by ``--json``; raises ValueError with the path on anything else."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read a bench report ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("rows"), list):
        raise ValueError(f"{path}: not a diffkern bench report (no 'rows' list)")
    return report
