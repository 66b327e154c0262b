#!/usr/bin/env python
"""Forecasting TabDiff's trunk on Adult: fidelity against NFE (issue #12, item 4).

With the shipped Adult model, samples R rows (one seed for all) with the plain 50-step sampler,
with Spectrum (flex window 0.75 and 3.0), TaylorSeer and FORA at 50 steps (their official
schedules), and with the plain sampler at fewer steps, chosen so its NFE (real trunk
evaluations, ``2 * steps - 1`` with Heun) is the largest not above each forecaster's: the honest
baseline. Each table is scored like ``diffkern.tabdiff.evaluate`` (Shape and Trend errors from
sdmetrics, xgboost detection AUC) against R rows of the Adult test split (one subsample for all).

Then, per forecaster, a shadow run on ``--diag-rows`` rows: every forecast call also runs the
trunk, and the forecast error of the feature is compared with the feature's step-to-step change.

    OMP_NUM_THREADS=1 python scripts/tabdiff_forecast_study.py [--rows 10000] [--out FILE.json]

Results go to FILE.json (default ./tabdiff-forecast-study.json, git-ignored) after every row; a
rerun skips the rows already there. Seconds are wall-clock on a shared machine: indicative only.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import time

import torch

from diffkern.forecast import FORAConfig, SpectrumConfig, TaylorSeerConfig
from diffkern.tabdiff import datasets, evaluate as evaluate_module, load_shipped
from diffkern.tabdiff.forecasting import TrunkForecast, trunk_evaluations
from diffkern.tabdiff.sampler import sample_batch, sampler_tables

STEPS = 50
FORECASTERS = {
    "Spectrum a=0.75": SpectrumConfig(flex_window=0.75),
    "Spectrum a=3.0": SpectrumConfig(flex_window=3.0),
    "TaylorSeer N=4 O=1": TaylorSeerConfig(),
    "FORA N=3": FORAConfig(),
    # extra: the ridge penalty on T_0 shrinks the forecast, and the decoder has no norm before its
    # first attention to undo that (Spectrum's DiT hook point is a LayerNorm)
    "Spectrum a=0.75, T0 unpenalised": SpectrumConfig(flex_window=0.75, penalize_intercept=False),
}


def plan(extra_plain_steps=()) -> list:
    """(name, steps, forecast config or None) in run order."""
    rows = [("plain", STEPS, None)]
    rows += [(name, STEPS, cfg) for name, cfg in FORECASTERS.items()]
    baseline_steps = sorted({(trunk_evaluations(cfg, STEPS) + 1) // 2 for cfg in FORECASTERS.values()})
    rows += [("plain", steps, None) for steps in sorted(set(baseline_steps) | set(extra_plain_steps))]
    return rows


def _key(name: str, steps: int) -> str:
    return f"{name} @ {steps} steps"


def _single_thread_xgboost() -> None:
    """evaluate.py asks xgboost for 2 threads; this study runs on one (the machine is shared)."""
    xgb = evaluate_module._xgb()

    class OneThread:
        def __getattr__(self, name):
            return getattr(xgb, name)

        @staticmethod
        def XGBClassifier(**kw):
            return xgb.XGBClassifier(**{**kw, "n_jobs": 1})

    evaluate_module._xgb = lambda: OneThread()


def _save(results: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(results, fh, indent=1)
    os.replace(tmp, path)


def run_row(synth, train, reference, name, steps, cfg, rows, seed) -> dict:
    t0 = time.perf_counter()
    table = synth.sample(rows, seed=seed, steps=steps, progress=False, forecast=cfg)
    seconds = time.perf_counter() - t0
    scores = evaluate_module.evaluate(train, table, reference, metrics=("shape", "trend", "detection"), seed=seed)
    return {"method": name, "steps": steps, "nfe": trunk_evaluations(cfg, steps), "rows": rows,
            "shape_pct": 100 - scores["shape_error"], "trend_pct": 100 - scores["trend_error"],
            "detection_auc": scores["detection_auc"], "sample_seconds": seconds,
            "config": None if cfg is None else {"type": type(cfg).__name__, **dataclasses.asdict(cfg)}}


def diagnose(synth, cfg, rows, seed, stochastic=True) -> dict:
    """Forecast error of the trunk feature against its step-to-step change (shadow run)."""
    model = synth.model
    model.eval()
    state = TrunkForecast(cfg, STEPS, shadow=True)
    sample_batch(model, sampler_tables(model, STEPS, stochastic), rows, seed=seed, forecast=state)
    ratios = [err / change for _, err, change, _ in state.errors if change > 0]
    relative = [err / norm for _, err, _, norm in state.errors]
    by_step = {}
    for step, err, change, _ in state.errors:
        by_step.setdefault(step, []).append(err / change if change > 0 else math.nan)
    return {"rows": rows, "forecast_calls": state.forecast_calls, "trunk_calls": state.trunk_calls,
            "error_over_change_median": statistics.median(ratios), "error_over_change_max": max(ratios),
            "error_over_norm_median": statistics.median(relative),
            "error_over_change_by_step": {str(s): max(v) for s, v in sorted(by_step.items())}}


def smoothness(synth, rows, seed) -> dict:
    """Method-free: how predictable is the Euler calls' trunk feature of the plain 50-step run?
    Per row, the cosine between consecutive increments (1: straight line, 0: random walk) and
    ||second difference|| / ||first difference|| (0 for a straight line, sqrt(2) for a random walk
    with independent steps), medians over rows per step, then over steps."""
    model = synth.model
    model.eval()
    outputs = []
    handle = model.network.trunk.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    try:
        sample_batch(model, sampler_tables(model, STEPS), rows, seed=seed)
    finally:
        handle.remove()
    euler = torch.stack(outputs[0::2]).double()                  # [steps, rows, features]: E0 H0 E1 H1 ... E49
    first = euler[1:] - euler[:-1]
    cosine = torch.nn.functional.cosine_similarity(first[1:], first[:-1], dim=-1)     # [steps - 2, rows]
    second_ratio = (first[1:] - first[:-1]).norm(dim=-1) / first[:-1].norm(dim=-1)
    cos_by_step = cosine.median(dim=1).values
    ratio_by_step = second_ratio.median(dim=1).values
    return {"rows": rows, "increment_cosine_median": float(cos_by_step.median()),
            "second_over_first_difference_median": float(ratio_by_step.median()),
            "increment_cosine_by_step": [round(float(v), 4) for v in cos_by_step],
            "second_over_first_by_step": [round(float(v), 4) for v in ratio_by_step]}


def table_markdown(results: dict) -> str:
    lines = ["| method | steps | NFE | Shape % | Trend % | detection AUC | seconds |", "|---|---|---|---|---|---|---|"]
    rows = sorted(results["rows"].values(), key=lambda r: (-r["nfe"], r["method"] != "plain", r["method"]))
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | {r['shape_pct']:.2f} | {r['trend_pct']:.2f} "
                     f"| {r['detection_auc']:.4f} | {r['sample_seconds']:.0f} |")
    return "\n".join(lines)


def diagnosis_markdown(results: dict) -> str:
    lines = ["| method | forecast calls / row | median ‖err‖/‖step change‖ | max | median ‖err‖/‖feature‖ |",
             "|---|---|---|---|---|"]
    for name, d in results["diagnostics"].items():
        lines.append(f"| {name} | {d['forecast_calls']} | {d['error_over_change_median']:.2f} "
                     f"| {d['error_over_change_max']:.2f} | {d['error_over_norm_median']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diag-rows", type=int, default=2_000)
    parser.add_argument("--out", default="tabdiff-forecast-study.json")
    parser.add_argument("--extra-plain-steps", type=int, nargs="*", default=[],
                        help="more plain-sampler rows, e.g. the step count of equal wall time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _single_thread_xgboost()

    results = {"rows": {}, "diagnostics": {}}
    if os.path.isfile(args.out):
        with open(args.out) as fh:
            results = json.load(fh)
        if results.get("settings", {}).get("rows", args.rows) != args.rows:
            raise SystemExit(f"{args.out} holds a study with rows={results['settings']['rows']}; "
                             "pass another --out")
    results["settings"] = {"rows": args.rows, "seed": args.seed, "diag_rows": args.diag_rows, "model": "shipped adult"}

    synth = load_shipped("adult")
    train, test = datasets.load_adult()
    reference = test.sample(n=min(args.rows, len(test)), random_state=args.seed).reset_index(drop=True)

    todo = plan(args.extra_plain_steps)
    for n, (name, steps, cfg) in enumerate(todo, 1):
        key = _key(name, steps)
        if key in results["rows"]:
            print(f"[{n}/{len(todo)}] {key}: cached", flush=True)
            continue
        t0 = time.perf_counter()
        results["rows"][key] = run_row(synth, train, reference, name, steps, cfg, args.rows, args.seed)
        _save(results, args.out)
        r = results["rows"][key]
        print(f"[{n}/{len(todo)}] {key}: NFE {r['nfe']}, Shape {r['shape_pct']:.2f}, Trend {r['trend_pct']:.2f}, "
              f"AUC {r['detection_auc']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    # the same error without churn noise: how much of it is the stochastic sampler's fresh noise
    diagnoses = [(name, cfg, True) for name, cfg in FORECASTERS.items()]
    diagnoses += [(name + ", no churn (deterministic sampler)", FORECASTERS[name], False)
                  for name in ("Spectrum a=0.75", "FORA N=3")]
    for name, cfg, stochastic in diagnoses:
        if name in results["diagnostics"]:
            continue
        t0 = time.perf_counter()
        results["diagnostics"][name] = diagnose(synth, cfg, args.diag_rows, args.seed, stochastic)
        _save(results, args.out)
        print(f"diagnosis {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    if "smoothness" not in results:
        results["smoothness"] = smoothness(synth, args.diag_rows, args.seed)
        _save(results, args.out)
    print()
    print(table_markdown(results))
    print()
    print(diagnosis_markdown(results))
    sm = results["smoothness"]
    print(f"\nplain 50-step trunk feature, Euler calls, median over rows and steps: cosine of consecutive "
          f"increments {sm['increment_cosine_median']:.3f}, ||second diff|| / ||first diff|| "
          f"{sm['second_over_first_difference_median']:.3f}")


if __name__ == "__main__":
    main()
