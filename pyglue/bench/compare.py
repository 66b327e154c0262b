"""``diffkern bench --compare BASE.json [NEW.json]``: two runs, row by row.

Rows match on (device, op, shape, impl). For each pair timed in both runs it prints the ratio of
medians (NEW / BASE, above 1 = slower) and whether the row moved beyond its own noise: each
row's repeats span [min, max] in its run, and a row moved only when the two spans do not
overlap. Machines drift, so a move within the spans is reported as noise, not as a change.
With ``--fail-ratio R`` a row that is slower beyond noise by more than R (or timed in BASE and
failing in NEW) makes the command exit 1, pytest-benchmark ``--benchmark-compare-fail`` style.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

SLOWER, FASTER, NOISE, UNKNOWN = "slower", "faster", "within noise", "no spread recorded"


@dataclasses.dataclass
class Pair:
    key: tuple[str, str, str, str]       # (device, op, shape, impl)
    base: dict
    new: dict

    @property
    def ratio(self) -> float:
        return self.new["median_ms"] / self.base["median_ms"]

    @property
    def verdict(self) -> str:
        b_lo, b_hi, n_lo, n_hi = (r.get(f) for r in (self.base, self.new) for f in ("min_ms", "max_ms"))
        if not all(_finite(v) for v in (b_lo, b_hi, n_lo, n_hi)):
            return UNKNOWN               # a report written before the spread was recorded
        if n_lo > b_hi:
            return SLOWER
        if n_hi < b_lo:
            return FASTER
        return NOISE


@dataclasses.dataclass
class Comparison:
    pairs: list[Pair]                    # timed in both runs
    lost: list[Pair]                     # timed in BASE, not in NEW (failed or skipped there)
    only_base: list[tuple]
    only_new: list[tuple]

    def regressions(self, fail_ratio: float) -> list[str]:
        """Why the comparison fails at ``fail_ratio`` (empty: it passes)."""
        why = [f"{_name(p.key)}: {p.ratio:.2f}x slower, " + ("beyond noise" if p.verdict == SLOWER else UNKNOWN)
               for p in self.pairs if p.verdict in (SLOWER, UNKNOWN) and p.ratio > fail_ratio]
        why += [f"{_name(p.key)}: {p.new['note']}" for p in self.lost if p.new["note"].startswith("failed")]
        return why


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _key(row: dict) -> tuple[str, str, str, str]:
    return row.get("device", "cpu"), row["op"], row["label"], row["impl"]


def _name(key: tuple) -> str:
    device, op, label, impl = key
    return f"{op} {label} {impl}" + (f" ({device})" if device != "cpu" else "")


def compare(base: dict, new: dict) -> Comparison:
    base_rows = {_key(r): r for r in base["rows"]}
    new_rows = {_key(r): r for r in new["rows"]}
    pairs, lost = [], []
    for key, b in base_rows.items():
        n = new_rows.get(key)
        if n is None or not _finite(b["median_ms"]):
            continue
        (pairs if _finite(n["median_ms"]) else lost).append(Pair(key, b, n))
    return Comparison(pairs, lost,
                      only_base=[k for k in base_rows if k not in new_rows],
                      only_new=[k for k in new_rows if k not in base_rows])


def no_match_reason(base: dict, new: dict) -> str:
    """One line saying why two reports share no timed row."""
    hint = ""
    if base.get("quick") != new.get("quick"):
        hint = f" (BASE quick={base.get('quick')}, NEW quick={new.get('quick')}: compare runs of one mode)"
    elif base["machine"].get("device", "cpu") != new["machine"].get("device", "cpu"):
        hint = " (the runs are on different devices)"
    return f"no row is timed in both reports{hint}"


def _ms(row: dict) -> str:
    spread = f" [{row['min_ms']:.3g}-{row['max_ms']:.3g}]" if _finite(row.get("min_ms")) else ""
    return f"{row['median_ms']:.3g}{spread}"


def _describe(report: dict, path: str) -> str:
    m = report["machine"]
    return (f"{path} ({m.get('device_name', m.get('device', 'cpu'))}, {m['threads']} threads, torch {m['torch']}"
            f"{', quick' if report.get('quick') else ''})")


def format_comparison(cmp: Comparison, base: dict, new: dict, base_path: str, new_path: str) -> str:
    cols = ("op", "shape", "impl", "BASE ms [min-max]", "NEW ms [min-max]", "NEW/BASE", "moved")
    lines = [(p.key[1], p.key[2], p.key[3], _ms(p.base), _ms(p.new), f"{p.ratio:.2f}x",
              {SLOWER: "SLOWER", FASTER: "faster", NOISE: "~", UNKNOWN: "?"}[p.verdict]) for p in cmp.pairs]
    lines += [(p.key[1], p.key[2], p.key[3], _ms(p.base), p.new["note"] or "not timed", "-", "-") for p in cmp.lost]
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i < 3 or i == 6 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    counts = {v: sum(p.verdict == v for p in cmp.pairs) for v in (SLOWER, FASTER, NOISE, UNKNOWN)}
    out = [f"BASE {_describe(base, base_path)}", f"NEW  {_describe(new, new_path)}",
           "moved: SLOWER / faster = the repeat spans [min-max] of the two runs do not overlap; "
           "~ = within the runs' own noise", fmt_line(cols), fmt_line(["-" * w for w in widths])]
    out += [fmt_line(line) for line in lines]
    summary = (f"{len(cmp.pairs)} rows timed in both: {counts[SLOWER]} slower and {counts[FASTER]} faster "
               f"beyond noise, {counts[NOISE]} within noise")
    if counts[UNKNOWN]:
        summary += f", {counts[UNKNOWN]} without a recorded spread (older report)"
    extra = [f"{len(cmp.lost)} timed in BASE only"] if cmp.lost else []
    extra += [f"{len(cmp.only_base)} rows only in BASE"] if cmp.only_base else []
    extra += [f"{len(cmp.only_new)} rows only in NEW"] if cmp.only_new else []
    out.append(summary + ("; " + ", ".join(extra) if extra else ""))
    return "\n".join(out)


def run_compare(base: dict, new: dict, base_path: str, new_path: str,
                fail_ratio: Optional[float]) -> tuple[str, int]:
    """``(text to print, exit status)``: 0 = no regression past ``fail_ratio``, 1 = some,
    2 = nothing to compare."""
    cmp = compare(base, new)
    if not cmp.pairs:
        return f"diffkern bench --compare: {base_path} vs {new_path}: {no_match_reason(base, new)}", 2
    text = format_comparison(cmp, base, new, base_path, new_path)
    if fail_ratio is None:
        return text, 0
    failing = cmp.regressions(fail_ratio)
    if not failing:
        return text + f"\nOK: no row slower than {fail_ratio:g}x beyond noise", 0
    return text + f"\nFAIL (--fail-ratio {fail_ratio:g}):\n  " + "\n  ".join(failing), 1
