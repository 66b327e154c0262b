"""``diffkern demo poe-bridge``: the PoE-Bridge study (see :mod:`diffkern.poe_bridge.study`).

On a shipped task pair (``--task modchain``, the main task, by default; ``reorganize``, the stress
task; ``letter-sort``, the first pair), every method decodes the same held-out problems for every
seed (300 x 3; ``--quick``: 100 x 1): AR alone, DLM decoding at 1/2/4 tokens per forward and at
matched forwards, speculative decoding, importance sampling alone, PoE-Bridge over a w x K sweep,
the official configuration and two ablations. Printed per setting (pooled over seeds): accuracy
with a Wilson 95 % interval, DLM and AR forwards per problem, tokens per DLM forward, acceptance,
ESS/K, the AR model's NLL of the generated tokens and wall time per problem (secondary: on CPU the
K particles have no parallel slack); then the claims with paired-bootstrap intervals.

``--json PATH`` writes ``{"rows": [...one per setting and seed...], "pooled": [...], "claims":
[{"name", "holds", "value", "interval", "statement"}], "settings": {...}}``; ``--png PATH`` plots
accuracy against DLM forwards.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

#: Per task: (W, M) of the decoder; M covers the answer canvas.
WINDOWS = {"modchain": (4, 20), "reorganize": (4, 13), "letter-sort": (8, 16)}
#: The default w, fixed before any study run: the official demo's value, and the design's reading
#: of ModChain (both corpora follow their style with p = 0.9, so only w > 0.5 lets the DLM's
#: confident style outvote the AR model's at a benign style point).
DEFAULT_WEIGHT = 0.7


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", choices=sorted(WINDOWS), default="modchain", help="shipped task pair")
    parser.add_argument("--quick", action="store_true", help="100 problems x 1 seed")
    parser.add_argument("--num-problems", type=int, default=None, help="held-out problems (default 300; quick 100)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
    parser.add_argument("--batch-size", type=int, default=25, help="prompts per generate call")
    parser.add_argument("--weight", type=float, default=DEFAULT_WEIGHT,
                        help=f"default PoE-Bridge w, the one the claims use (default {DEFAULT_WEIGHT})")
    parser.add_argument("--sweep-weights", type=float, nargs="+", default=None,
                        help="w values of the sweep (default 0 0.3 0.5 0.7 1; the claims need the default)")
    parser.add_argument("--sweep-particles", type=int, nargs="+", default=None,
                        help="K values of the sweep (default 1 4 8; the claims need 4 and 8)")
    parser.add_argument("--is-particles", type=int, nargs="*", default=[16],
                        help="extra K for importance sampling alone (default 16)")
    parser.add_argument("--window", type=int, default=None, help="AR verification window W (default per task)")
    parser.add_argument("--lookahead", type=int, default=None, help="DLM draft span M (default per task)")
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the official, ablation and reference-backend rows")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write rows and claims as JSON")
    parser.add_argument("--png", metavar="PATH", default=None, help="plot accuracy against DLM forwards")


def _check_args(args) -> None:
    for name in ("num_problems", "seeds", "batch_size", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {v}")
    if not 0.0 <= args.weight <= 1.0:
        raise ValueError(f"--weight: must be in [0, 1], got {args.weight}")
    if args.sweep_particles is not None and 4 not in args.sweep_particles:
        raise ValueError(f"--sweep-particles: must include 4 (the default setting), got {args.sweep_particles}")


def build_settings(args, spec, draft, target, eos: int):
    """The settings in run order; ``dlm-matched`` is added after the default PoE-Bridge ran."""
    from .config import PoEBridgeConfig
    from .study import PARTICLES, WEIGHTS, ar_setting, dlm_setting, poe_setting, sweep_method
    W, M = WINDOWS[spec.name]
    T, top_p, N = 0.2, 0.95, spec.max_new_tokens
    base = PoEBridgeConfig(num_particles=4, weight=args.weight, window=args.window or W,
                           max_lookahead=args.lookahead or M, max_new_tokens=N, temperature=T,
                           high_temperature=0.7, top_p=top_p)
    settings = [ar_setting(target, N, eos, T, top_p)]
    settings += [dlm_setting(f"dlm-{k}", draft, k, N, eos, T, top_p) for k in (1, 2, 4)]
    settings.append(poe_setting("speculative", draft, target, base, eos))
    weights = sorted(set(args.sweep_weights or WEIGHTS) | {args.weight})
    for K in args.sweep_particles or PARTICLES:
        for w in weights:
            method = sweep_method(w, K)
            settings.append(poe_setting(method, draft, target, base.replace(weight=w, num_particles=K), eos))
    for K in args.is_particles:
        settings.append(poe_setting("is-only", draft, target, base.replace(weight=1.0, num_particles=K), eos))
    if not args.no_extras:
        settings.append(poe_setting("official", draft, target,
                                    base.replace(weights="parity", selection="argmax"), eos))
        settings.append(poe_setting("poe-bridge-no-mixed-temp", draft, target,
                                    base.replace(anneal=False, n_low_temp=4), eos))
        settings.append(poe_setting("poe-bridge-no-elastic", draft, target,
                                    base.replace(window=base.max_lookahead), eos))
        settings.append(poe_setting("poe-bridge", draft, target, base, eos, backend="reference"))
    # drop duplicates (e.g. K=1 at w=0 twice)
    seen, unique = set(), []
    for s in settings:
        if s.label not in seen:
            seen.add(s.label)
            unique.append(s)
    return unique, base


def run_matched(spec, draft, eos, results, default_label, measure_fn):
    """DLM decoding at the smallest k whose DLM forwards do not exceed the default PoE-Bridge's."""
    from .study import dlm_setting, metric
    target_f = metric(results[default_label], "dlm_forwards")
    k = max(1, math.ceil(metric(results["dlm-1"], "dlm_forwards") / max(target_f, 1e-9)))
    while True:
        m = measure_fn(dlm_setting("dlm-matched", draft, k, spec.max_new_tokens, eos, 0.2, 0.95))
        if metric(m, "dlm_forwards") <= target_f or k >= spec.max_new_tokens:
            return m
        k += 1


def print_table(pooled_rows, header: str) -> None:
    print(header)
    hdr = (f"{'setting':<34} {'acc':>5} {'[95% CI]':>13} {'DLM fwd':>7} {'AR fwd':>7} {'tok/DLMf':>8} "
           f"{'accept':>6} {'ESS/K':>5} {'AR-NLL':>6} {'s/prob':>7}")
    print(hdr)
    print("-" * len(hdr))

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-".rjust(len(format(0.0, fmt)))
    for r in pooled_rows:
        ci = f"[{r['accuracy_ci'][0]:.2f},{r['accuracy_ci'][1]:.2f}]"
        print(f"{r['label']:<34} {r['accuracy']:>5.3f} {ci:>13} {f(r['dlm_forwards'], '7.2f')} "
              f"{f(r['ar_forwards'], '7.2f')} {f(r['tokens_per_dlm_forward'], '8.2f')} "
              f"{f(r['acceptance'], '6.3f')} {f(r['ess_over_k'], '5.2f')} {f(r['ar_nll'], '6.3f')} "
              f"{r['seconds_per_problem']:>7.3f}")


def print_claims(claims) -> None:
    print("\nclaims (pooled over seeds; interval = paired bootstrap 95 %):")
    for c in claims:
        v = c.value if not isinstance(c.value, float) else f"{c.value:.3f}"
        iv = c.interval
        if isinstance(iv, list) and iv and not isinstance(iv[0], list):
            iv = f"[{iv[0]:.3f}, {iv[1]:.3f}]"
        elif isinstance(iv, list):
            iv = "; ".join(f"[{a:.3f},{b:.3f}]" for a, b in iv)
        if isinstance(v, list):
            v = "[" + ", ".join(f"{x:.3f}" for x in v) + "]"
        print(f"  {'HOLDS' if c.holds else 'FAILS':<5} {c.name:<48} {v} {iv}   ({c.statement})")


#: Methods whose drafts the AR model checks; they crowd one corner, drawn again in a zoomed panel.
_CHECKED = ("speculative", "poe-bridge", "official")
_COLOURS = {"speculative": "tab:orange", "is-only": "tab:red", "poe-bridge": "tab:blue", "official": "tab:purple"}


def _spread_labels(ax, points, xlog: bool, min_gap: float) -> None:
    """Annotate ``points`` ([(x, y, label)]) so that no two labels at nearby x overlap: labels are
    pushed up, in order of y, to at least ``min_gap`` (in y units) above any earlier nearby one,
    with a thin leader line when a label moved."""
    import math
    width = ax.get_xlim()[1] - ax.get_xlim()[0]
    near = (lambda a, b: abs(math.log10(a) - math.log10(b)) < 0.3) if xlog else (lambda a, b: abs(a - b) < 0.12 * width)
    placed = []
    for x, y, label in sorted(points, key=lambda p: p[1]):
        ly = y
        for px, pl in placed:
            if near(x, px) and ly - pl < min_gap:
                ly = pl + min_gap
        placed.append((x, ly))
        tx = x * 1.04 if xlog else x + 0.02 * width
        arrow = dict(arrowstyle="-", lw=0.4, color="0.5") if ly - y > 1e-9 else None
        ax.annotate(label, (x, y), xytext=(tx, ly), fontsize=6, ha="left", va="center", arrowprops=arrow)


def _in_sweep(row, default_label) -> bool:
    """A PoE-Bridge sweep point other than the default: drawn small and unlabelled."""
    return row["method"] == "poe-bridge" and row["label"] != default_label


def _draw_rows(ax, rows, default_label):
    """Error bars per row; the default PoE-Bridge setting as a large star."""
    for r in rows:
        c = _COLOURS.get(r["method"], "tab:green" if r["method"].startswith("dlm") else "tab:gray")
        sweep = _in_sweep(r, default_label)
        lo, hi = r["accuracy_ci"]
        default = r["label"] == default_label
        ax.errorbar(r["dlm_forwards"], r["accuracy"], yerr=[[r["accuracy"] - lo], [hi - r["accuracy"]]],
                    fmt="*" if default else "o", color=c, ms=11 if default else 3 if sweep else 5,
                    lw=0.6, alpha=0.45 if sweep else 1.0, zorder=3 if default else 2)


def plot(pooled_rows, path: str, title: str, default_label: str) -> None:
    """Accuracy (Wilson 95 %) against DLM forwards per problem. Left: every setting (log x). Right:
    a zoom on the decoders the AR model checks (speculative, PoE-Bridge, official), which crowd
    one corner; the PoE-Bridge sweep is drawn unlabelled except for the default setting."""
    import textwrap
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ar_rows = [r for r in pooled_rows if not r["dlm_forwards"]]
    rows = [r for r in pooled_rows if r["dlm_forwards"]]
    checked = [r for r in rows if r["method"].split("-no-")[0] in _CHECKED]
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 5.5), gridspec_kw={"width_ratios": [1.15, 1]})
    for a in (ax, zoom):
        for r in ar_rows:
            a.axhline(r["accuracy"], color="black", ls="--", lw=1, label=f"AR alone ({r['accuracy']:.2f})")
        a.plot([], [], "o", color="tab:blue", alpha=0.45, ms=3, label="PoE-Bridge sweep (w, K)")
        a.set_ylabel("accuracy (Wilson 95 %)")
    _draw_rows(ax, rows, default_label)
    ax.set_xscale("log")
    ax.set_xlabel("DLM forwards per problem (log)")
    ax.set_title("every setting", fontsize=8)
    lo_y, hi_y = ax.get_ylim()
    others = [(r["dlm_forwards"], r["accuracy"], r["label"]) for r in rows if r not in checked]
    if checked:
        xs = [r["dlm_forwards"] for r in checked]
        ys = [r["accuracy"] for r in checked]
        others.append((min(xs), max(ys) + 0.04 * (hi_y - lo_y), "checked by the AR model: zoom right"))
    _spread_labels(ax, others, xlog=True, min_gap=0.035 * (hi_y - lo_y))
    ax.legend(fontsize=7, loc="center left")
    if checked:
        _draw_rows(zoom, checked, default_label)
        zoom.margins(x=0.25, y=0.15)
        zoom.set_xlabel("DLM forwards per problem")
        zoom.set_title("zoom: speculative, PoE-Bridge, official (AR-checked)", fontsize=8)
        zlo, zhi = zoom.get_ylim()
        labelled = [(r["dlm_forwards"], r["accuracy"], r["label"]) for r in checked if not _in_sweep(r, default_label)]
        _spread_labels(zoom, labelled, xlog=False, min_gap=0.05 * (zhi - zlo))
        zoom.legend(fontsize=7, loc="lower left")
    else:
        zoom.set_visible(False)
    fig.suptitle("\n".join(textwrap.wrap(title, 160)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    from .._optional import require
    require("transformers", "diffkern demo poe-bridge")
    from . import tasks
    from .adapters import MaskedLMDraft
    from .models import load_pair
    from .study import Bootstrap, claims, measure, row

    torch.set_num_threads(args.threads)
    n = args.num_problems or (100 if args.quick else 300)
    num_seeds = args.seeds or (1 if args.quick else 3)
    seeds = list(range(args.seed, args.seed + num_seeds))
    spec = tasks.get(args.task)
    tok, dlm, ar = load_pair(args.task)
    draft = MaskedLMDraft(dlm, mask_token_id=tok.mask_token_id)
    eos = tok.eos_token_id
    problems = spec.problems(n, 1234, "test")
    prompts = [tok(p.prompt)["input_ids"] for p in problems]
    settings, base = build_settings(args, spec, draft, ar, eos)

    def measure_fn(s):
        return measure(s, spec, tok, ar, problems, prompts, seeds, args.batch_size)

    default = next(s for s in settings if s.method == "poe-bridge" and s.weight == args.weight
                   and s.particles == 4 and s.backend == "auto")
    default_label = default.label
    default.run(prompts[:2], 0)   # warm-up (allocators, the C++ ops' first call)
    results = {}
    for s in settings:
        results[s.label] = measure_fn(s)
        if s.label == default_label:
            m = run_matched(spec, draft, eos, results, default_label, measure_fn)
            results[m.setting.label] = m
    pooled = [row(args.task, m) for m in results.values()]
    per_seed = [row(args.task, m, s) for m in results.values() for s in sorted(m.per_seed)]
    header = (f"PoE-Bridge study, task {args.task}: {n} held-out problems x {num_seeds} seed(s), default "
              f"w={base.weight} K=4, W={base.window}, M={base.max_lookahead}, T={base.temperature} "
              f"(T_hi {base.high_temperature}), top-p {base.top_p}, {base.selection}/{base.weights} weights, "
              f"{args.threads} thread(s)")
    print_table(pooled, header)
    try:
        found = claims(results, args.weight, Bootstrap(n))
    except KeyError as err:   # a reduced sweep: report the rows, say which claim inputs are missing
        print(f"\nclaims not evaluated: {err}")
        found = []
    print_claims(found)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": per_seed, "pooled": pooled, "claims": [c.as_dict() for c in found],
                       "settings": {"task": args.task, "num_problems": n, "seeds": seeds,
                                    "config": {k: v for k, v in vars(base).items()},
                                    "threads": args.threads, "quick": bool(args.quick)}}, f, indent=1)
        print("wrote", args.json)
    if args.png:
        plot(pooled, args.png, header, default_label)
        print("wrote", args.png)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="diffkern demo poe-bridge", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
