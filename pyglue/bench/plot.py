"""The PNG of ``diffkern bench`` (moved here from harness.py unchanged)."""

from __future__ import annotations

import os
from typing import Optional


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
