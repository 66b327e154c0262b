"""``diffkern demo tabdiff``: the shipped TabDiff model against SDV's synthesizers on UCI Adult.

Three synthetic tables of the training size (32,561 rows) per method, scored by
:func:`diffkern.tabdiff.evaluate.evaluate` against the official test split (16,281 rows), mean
± std per metric; the methods are TabDiff (``load_shipped("adult")``, trained by
``scripts/train_tabdiff.py``), SDV 2.0's GaussianCopula, CTGAN and TVAE at their defaults (an
optional, BUSL-licensed extra used for comparison only) and an independent-marginals table
(each training column shuffled on its own). Then the imputation of ``income`` on 2,000 test rows
with guidance 0.6 and 0, against xgboost trained on the real training table. Writes a PNG of
marginals and of the pairwise-association differences and, with ``--json``, the rows.

Every finished (method, table) row is cached in ``--cache`` (a JSON file), so an interrupted run
continues where it stopped; ``--fresh`` ignores the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Optional

import numpy as np
import pandas as pd

from . import datasets
from .evaluate import METRICS, evaluate

METHODS = ("tabdiff", "gaussiancopula", "ctgan", "tvae", "independent")
SDV_CLASSES = {"gaussiancopula": "GaussianCopulaSynthesizer", "ctgan": "CTGANSynthesizer",
               "tvae": "TVAESynthesizer"}
KEYS = ("shape_error", "trend_error", "detection_auc", "logistic_detection", "alpha_precision", "beta_recall",
        "dcr_share", "mle_auc")
PAPER = {"source": "TabDiff (Shi et al., ICLR 2025), Table 1-2, Adult; GPU, 8000 epochs, 20 tables",
         "shape_error": 0.63, "trend_error": 1.49, "mle_auc": 0.912,
         "protocol_differences": [
             "paper: sdmetrics unpinned (0.11-era) with its default subsampling; here sdmetrics 0.32, no subsampling",
             "here: Shape/Trend against the held-out test split (the floor is two samples of one "
             "population, 0.61 % / 1.36 %); which real table the paper's figures use was not re-checked",
             "paper: 20 synthetic tables; here 3",
             "paper: 8000 epochs, dim_t 1024 on a GPU; here the shipped CPU model (TabDiffConfig())",
         ]}
QUICK_ROWS = 2000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of %(default)s")
    p.add_argument("--baselines", nargs="*", choices=METHODS[1:], default=None,
                   help="the baselines to run beside TabDiff (default: all); same as --methods tabdiff,...")
    p.add_argument("--tables", type=int, default=3, help="synthetic tables per method (default 3)")
    p.add_argument("--steps", type=int, default=None, help="TabDiff sampler steps (default: the model's 50)")
    p.add_argument("--quick", action="store_true",
                   help=f"under a minute: {QUICK_ROWS} rows, one table, 10 steps, TabDiff vs independent, no MLE/imputation")
    p.add_argument("--no-impute", action="store_true", help="skip the imputation study")
    p.add_argument("--impute-rows", type=int, default=2000)
    p.add_argument("--impute-trials", type=int, default=10,
                   help="imputations per test row, averaged into a probability (official: 50)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--png", default="tabdiff_adult.png", help="marginals and association differences ('' to skip)")
    p.add_argument("--cache", default="tabdiff-demo-cache.json", help="finished rows, for resuming ('' for none)")
    p.add_argument("--fresh", action="store_true", help="ignore the cache")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")


# ---- methods --------------------------------------------------------------------------------

def _sdv_fit(name: str, train: pd.DataFrame, seed: int):
    from .._optional import require

    single_table = require("sdv.single_table", f"the {name} baseline")
    from sdv.metadata import Metadata

    import torch

    torch.manual_seed(seed)
    np.random.seed(seed)
    metadata = Metadata.detect_from_dataframes({"adult": train}, infer_keys=None)   # no column is a key
    synth = getattr(single_table, SDV_CLASSES[name])(metadata)
    synth.fit({"adult": train})          # SDV 2.0 takes {table name: frame}
    return synth


class Method:
    """Fit once (timed), then draw tables by seed."""

    def __init__(self, name: str, train: pd.DataFrame, steps: Optional[int], progress: bool):
        self.name, self.train, self.steps, self.progress = name, train, steps, progress
        self.train_seconds: Optional[float] = None
        self._model = None

    def fit(self) -> None:
        started = time.perf_counter()
        if self.name == "tabdiff":
            from .shipped import load_shipped

            self._model = load_shipped("adult")
            self.train_seconds = self._model.train_seconds        # measured when it was trained
            return
        if self.name in SDV_CLASSES:
            self._model = _sdv_fit(self.name, self.train, seed=0)
        self.train_seconds = time.perf_counter() - started

    def sample(self, num_rows: int, seed: int) -> pd.DataFrame:
        if self._model is None and self.name != "independent":
            self.fit()
        if self.name == "tabdiff":
            return self._model.sample(num_rows, seed=seed, steps=self.steps, progress=self.progress)
        if self.name == "independent":
            rng = np.random.default_rng(seed)
            return pd.DataFrame({c: self.train[c].to_numpy()[rng.choice(len(self.train), num_rows)]
                                 for c in self.train.columns})
        import torch

        torch.manual_seed(seed)
        np.random.seed(seed)
        if hasattr(self._model, "_set_random_state"):
            self._model._set_random_state(seed)
        table = self._model.sample(num_rows)
        return table["adult"] if isinstance(table, dict) else table


# ---- the study ------------------------------------------------------------------------------

def _load_cache(path: str, fresh: bool, signature: dict) -> dict:
    if not path or fresh or not os.path.exists(path):
        return {"signature": signature, "rows": {}, "fits": {}}
    with open(path) as f:
        cache = json.load(f)
    return cache if cache.get("signature") == signature else {"signature": signature, "rows": {}, "fits": {}}


def _save_cache(path: str, cache: dict) -> None:
    if path:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)


def _table_path(cache_path: str, method: str) -> str:
    """Where the first table of ``method`` is kept for the picture (beside the cache)."""
    return f"{cache_path}.{method}-0.pkl.gz" if cache_path else ""


def run_study(methods, tables: int, num_rows: int, metrics, steps, cache_path: str, fresh: bool,
              log: Callable[[str], None] = print, keep: tuple = ()) -> tuple[list[dict], dict]:
    """One row per (method, table); ``keep`` names methods whose first table is returned for plots."""
    train, test = datasets.load_adult()
    signature = {"rows": num_rows, "metrics": list(metrics), "steps": steps}
    cache = _load_cache(cache_path, fresh, signature)
    rows, first_tables = [], {}
    for name in methods:
        method = Method(name, train, steps, progress=True)
        for table in range(tables):
            key = f"{name}/{table}"
            saved = _table_path(cache_path, name) if table == 0 else ""
            if key in cache["rows"] and not (table == 0 and name in keep and not os.path.exists(saved)):
                rows.append(cache["rows"][key])
                if table == 0 and name in keep:
                    first_tables[name] = pd.read_pickle(saved)
                log(f"{name} table {table}: cached")
                continue
            if method.train_seconds is None and name != "independent":
                log(f"{name}: fitting ..." if name != "tabdiff" else "tabdiff: loading the shipped model")
                method.fit()
                log(f"{name}: trained in {method.train_seconds:.1f} s")
            started = time.perf_counter()
            synthetic = method.sample(num_rows, seed=table)
            sample_seconds = time.perf_counter() - started
            if table == 0 and name in keep:
                first_tables[name] = synthetic
                if saved:
                    synthetic.to_pickle(saved)        # our own file, read back only by this cache
            if key in cache["rows"]:
                rows.append(cache["rows"][key])
                continue
            scores = evaluate(train, synthetic, test, target=datasets.ADULT_TARGET, metrics=metrics, seed=table)
            row = {"method": name, "table": table, **{k: scores.get(k) for k in KEYS},
                   "train_seconds": method.train_seconds if name != "independent" else 0.0,
                   "sample_seconds": sample_seconds}
            cache["rows"][key] = row
            _save_cache(cache_path, cache)
            rows.append(row)
            log(f"{name} table {table}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                      if isinstance(v, float)))
    return rows, first_tables


def summary(rows: list[dict]) -> list[dict]:
    """Mean and std per method and metric (std over tables; 0 for a single table)."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        entry = {"method": name, "tables": len(mine)}
        for key in KEYS + ("train_seconds", "sample_seconds"):
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                entry[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        out.append(entry)
    return out


def format_summary(table: list[dict], real_mle: Optional[float]) -> str:
    cols = [("shape_error", "Shape err %", 2), ("trend_error", "Trend err %", 2), ("detection_auc", "detect AUC", 3),
            ("logistic_detection", "C2ST (LR)", 3), ("alpha_precision", "alpha-prec", 3),
            ("beta_recall", "beta-rec", 3), ("dcr_share", "DCR share", 3), ("mle_auc", "MLE AUC", 3),
            ("train_seconds", "train s", 0), ("sample_seconds", "sample s", 1)]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for entry in table:
        cells = []
        for key, _, digits in cols:
            if key not in entry:
                cells.append("-")
                continue
            mean, std = entry[key]
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}" if key not in ("train_seconds",) else f"{mean:.{digits}f}")
        lines.append(f"| {entry['method']} | " + " | ".join(cells) + " |")
    lines.append(f"| paper TabDiff (GPU, 8000 epochs) | {PAPER['shape_error']} | {PAPER['trend_error']} | - | - | - "
                 f"| - | - | {PAPER['mle_auc']} | - | - |")
    if real_mle is not None:
        lines.append(f"\nMLE AUC of xgboost trained on the real training table: {real_mle:.3f}")
    return "\n".join(lines)


# ---- imputation -----------------------------------------------------------------------------

def imputation_study(rows: int, trials: int, weights=(0.6, 0.0), seed: int = 0, log=print) -> dict:
    """ROC AUC of income imputed on ``rows`` test rows (``trials`` imputations averaged into a
    probability per row) at each guidance weight, against xgboost trained on the real table."""
    from sklearn.metrics import roc_auc_score

    from .evaluate import _one_hot, _kinds, _xgb
    from .shipped import load_shipped

    train, test = datasets.load_adult()
    target, positive = datasets.ADULT_TARGET, ">50K"
    picked = test.sample(rows, random_state=seed).reset_index(drop=True)
    truth = (picked[target] == positive).to_numpy()
    holed = picked.assign(**{target: None})
    synth = load_shipped("adult")
    out = {"rows": rows, "trials": trials}
    for w in weights:
        started = time.perf_counter()
        repeated = pd.concat([holed] * trials, ignore_index=True)
        filled = synth.impute(repeated, seed=seed, guidance=w, progress=True)
        prob = (filled[target].to_numpy() == positive).reshape(trials, rows).mean(0)
        out[f"auc_w{w:g}"] = float(roc_auc_score(truth, prob))
        out[f"accuracy_w{w:g}"] = float(((prob > 0.5) == truth).mean())
        out[f"seconds_w{w:g}"] = time.perf_counter() - started
        log(f"imputation w={w:g}: AUC {out[f'auc_w{w:g}']:.4f}, accuracy {out[f'accuracy_w{w:g}']:.4f} "
            f"({out[f'seconds_w{w:g}']:.0f} s)")
    xgb = _xgb()
    kinds = {c: k for c, k in _kinds(train).items() if c != target}
    x_train, x_test = _one_hot([train, picked], kinds, scale_numerical=False)
    model = xgb.XGBClassifier(n_estimators=100, max_depth=6, tree_method="hist", random_state=seed, n_jobs=2)
    model.fit(x_train, (train[target] == positive).to_numpy())
    out["auc_xgboost"] = float(roc_auc_score(truth, model.predict_proba(x_test)[:, 1]))
    log(f"imputation baseline: xgboost trained on the real table, AUC {out['auc_xgboost']:.4f}")
    return out


def real_mle_auc(seed: int = 0) -> float:
    from .evaluate import _kinds, _mle, MLE_GRID

    train, test = datasets.load_adult()
    return _mle(train, test, datasets.ADULT_TARGET, _kinds(train), seed, MLE_GRID)[1]


# ---- the picture ----------------------------------------------------------------------------

def association_matrix(df: pd.DataFrame, reference: pd.DataFrame, bins: int = 10) -> tuple[list[str], np.ndarray]:
    """Cramér's V between every pair of columns, numerical columns binned at the reference's deciles."""
    columns = list(reference.columns)
    codes = {}
    for c in columns:
        if pd.api.types.is_numeric_dtype(reference[c]) and reference[c].nunique() > bins:
            edges = np.unique(np.nanquantile(reference[c].to_numpy(float), np.linspace(0, 1, bins + 1)[1:-1]))
            codes[c] = np.digitize(pd.to_numeric(df[c], errors="coerce").fillna(-np.inf).to_numpy(), edges)
        else:
            codes[c] = pd.Categorical(df[c].astype(str), categories=sorted(reference[c].astype(str).unique())).codes
    V = np.eye(len(columns))
    for i, a in enumerate(columns):
        for j in range(i + 1, len(columns)):
            table = pd.crosstab(codes[a], codes[columns[j]]).to_numpy(float)
            n = table.sum()
            expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
            chi2 = ((table - expected) ** 2 / np.where(expected > 0, expected, 1)).sum()
            k = min(table.shape) - 1
            V[i, j] = V[j, i] = np.sqrt(chi2 / (n * k)) if k > 0 else 0.0
    return columns, V


def plot(real: pd.DataFrame, tables: dict, path: str) -> None:
    from .._optional import require

    require("matplotlib", "the demo's picture")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(tables)
    fig = plt.figure(figsize=(4 * max(4, len(names)), 8.5), constrained_layout=True)
    grid = fig.add_gridspec(2, max(4, len(names)))
    for k, column in enumerate(["age", "hours-per-week", "education", "marital-status"]):
        ax = fig.add_subplot(grid[0, k])
        if pd.api.types.is_numeric_dtype(real[column]):
            edges = np.histogram_bin_edges(real[column], bins=30)
            ax.hist(real[column], bins=edges, density=True, color="0.7", label="real (train)")
            for name in names:
                ax.hist(tables[name][column], bins=edges, density=True, histtype="step", lw=1.5, label=name)
        else:
            levels = real[column].value_counts().index[:8]
            x = np.arange(len(levels))
            width = 0.8 / (len(names) + 1)
            ax.bar(x, real[column].value_counts(normalize=True)[levels], width, color="0.7", label="real (train)")
            for i, name in enumerate(names):
                share = tables[name][column].value_counts(normalize=True).reindex(levels, fill_value=0)
                ax.bar(x + (i + 1) * width, share, width, label=name)
            ax.set_xticks(x + 0.4 - width / 2, [str(v)[:14] for v in levels], rotation=60, ha="right", fontsize=8)
        ax.set_title(column)
        if k == 0:
            ax.legend(fontsize=8)
    columns, real_v = association_matrix(real, real)
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1, i])
        diff = np.abs(association_matrix(tables[name], real)[1] - real_v)
        image = ax.imshow(diff, vmin=0, vmax=0.5, cmap="magma_r")
        ax.set_title(f"{name}: |ΔCramér's V|, mean {diff[np.triu_indices(len(columns), 1)].mean():.3f}", fontsize=10)
        ax.set_xticks(range(len(columns)), columns, rotation=90, fontsize=7)
        ax.set_yticks(range(len(columns)), columns if i == 0 else [], fontsize=7)
    fig.colorbar(image, ax=fig.axes[-1], shrink=0.8)
    fig.suptitle("UCI Adult: marginals (top) and pairwise-association error vs the real table (bottom)")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- entry point ----------------------------------------------------------------------------

def _methods(args) -> list[str]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.baselines is not None:
        methods = ["tabdiff", *args.baselines]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"diffkern demo tabdiff: --methods: unknown {unknown}; choose from {list(METHODS)}")
    if args.quick and args.baselines is None and args.methods == ",".join(METHODS):
        methods = ["tabdiff", "independent"]
    return methods


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = _methods(args)
    quick = args.quick
    num_rows = QUICK_ROWS if quick else len(datasets.load_adult()[0])
    tables = 1 if quick else args.tables
    steps = 10 if quick and args.steps is None else args.steps
    metrics = [m for m in METRICS if not (quick and m in ("mle", "logistic_detection"))]
    print(f"UCI Adult: {tables} synthetic table(s) of {num_rows} rows per method: {', '.join(methods)}")
    rows, first = run_study(methods, tables, num_rows, metrics, steps, "" if quick else args.cache, args.fresh,
                            keep=tuple(methods) if args.png else ())
    real = None if quick or "mle" not in metrics else real_mle_auc()
    table = summary(rows)
    print("\n" + format_summary(table, real))
    print("\npaper: " + PAPER["source"] + "; protocol differences:\n  - " + "\n  - ".join(PAPER["protocol_differences"]))
    imputation = None
    if not quick and not args.no_impute:
        imputation = imputation_study(args.impute_rows, args.impute_trials)
    if args.png:
        plot(datasets.load_adult()[0], first, args.png)
        print(f"wrote {args.png}")
    if args.json:
        report = {"rows": rows, "summary": table, "real_mle_auc": real, "paper": PAPER, "imputation": imputation,
                  "num_rows": num_rows, "steps": steps or 50}
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 0
