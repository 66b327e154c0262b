"""Fidelity, utility and privacy of a synthetic table, as the TabDiff paper measures them, plus a
detector that can see broken correlations.

``reference`` below is ``real_test`` when given (held out: memorising the training rows earns
nothing), else ``real_train``. Every score is deterministic for a given ``seed``.

=======================  ===========================================================================
key                      what
=======================  ===========================================================================
``shape_error``          (1 - sdmetrics QualityReport "Column Shapes") x 100 vs reference; no subsampling
``trend_error``          (1 - "Column Pair Trends") x 100 vs reference
``detection_auc``        5-fold cross-validated ROC AUC of gradient-boosted trees (xgboost) telling
                         reference rows from synthetic ones (balanced); 0.5 = indistinguishable
``logistic_detection``   sdmetrics ``LogisticDetection`` (the paper's C2ST) against ``real_train``, as
                         the paper (its encoder refuses categories the reference lacks, which a
                         held-out split can miss): 1 = indistinguishable. A linear detector: it
                         barely sees broken dependence between columns
``alpha_precision``,     the "naive" alpha-precision / beta-recall of synthcity (distances to the
``beta_recall``          reference centre + 1-NN) on [raw numerical | one-hot categorical], equal sizes
``dcr_share``            share of synthetic rows whose nearest (L1 on [numerical / range | one-hot])
                         training row is closer than their nearest holdout row, the training half
                         subsampled to the holdout's size; ideal 0.5 (needs ``real_test``)
``mle_auc`` / ``mle_rmse``  xgboost trained on the synthetic table (36-setting grid chosen on 1/9 of it),
                         scored on ``real_test`` (needs ``target``)
=======================  ===========================================================================
"""

from __future__ import annotations

import itertools
import warnings
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .schema import detect_schema

METRICS = ("shape", "trend", "detection", "logistic_detection", "alpha_beta", "dcr", "mle")
MLE_GRID = dict(n_estimators=[10, 50, 100], min_child_weight=[1, 10], max_depth=[5, 10, 20], gamma=[0.0, 1.0])


def _require(module: str):
    from .._optional import require

    return require(module, "diffkern.tabdiff.evaluate")


def _kinds(real: pd.DataFrame) -> dict[str, str]:
    return {s.name: s.kind for s in detect_schema(real, max_categories=10 ** 9)}


def _aligned(name: str, real: pd.DataFrame, other: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(other, pd.DataFrame):
        raise TypeError(f"{name}: expected a pandas DataFrame, got {type(other).__name__}")
    missing = [c for c in real.columns if c not in other.columns]
    if missing:
        raise ValueError(f"{name}: columns {missing} of real_train are missing")
    if len(other) == 0:
        raise ValueError(f"{name}: the table is empty")
    return other[list(real.columns)].reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# sdmetrics: Shape, Trend, LogisticDetection
# --------------------------------------------------------------------------------------------

def _sdmetrics_metadata(kinds: dict[str, str]) -> dict:
    sdtype = {"numerical": "numerical", "categorical": "categorical", "datetime": "datetime", "id": "id"}
    return {"columns": {c: {"sdtype": sdtype[k]} for c, k in kinds.items()}}


def _shape_trend(reference: pd.DataFrame, synthetic: pd.DataFrame, kinds: dict) -> tuple[float, float]:
    _require("sdmetrics")
    from sdmetrics.reports import QualityReport

    report = QualityReport()
    report.num_rows_subsample = None                  # the default subsamples 50k rows without a seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report.generate({"t": reference}, {"t": synthetic}, {"tables": {"t": _sdmetrics_metadata(kinds)}},
                        verbose=False)
    scores = report.get_properties().set_index("Property")["Score"]
    return 100 * (1 - float(scores["Column Shapes"])), 100 * (1 - float(scores["Column Pair Trends"]))


def _logistic_detection(reference: pd.DataFrame, synthetic: pd.DataFrame, kinds: dict) -> float:
    _require("sdmetrics")
    from sdmetrics.single_table import LogisticDetection

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(LogisticDetection.compute(reference, synthetic, _sdmetrics_metadata(kinds)))


# --------------------------------------------------------------------------------------------
# Encodings
# --------------------------------------------------------------------------------------------

def _as_text(series: pd.Series) -> pd.Series:
    """A categorical column as strings, NaN as its own level ``"<NaN>"``."""
    return series.astype(object).where(series.notna(), "<NaN>").astype(str)


def _one_hot(frames: Sequence[pd.DataFrame], kinds: dict, scale_numerical: bool) -> list[np.ndarray]:
    """[numerical (raw, or / training range) | one-hot categorical] with levels from all frames;
    numerical NaN -> the first frame's column mean, categorical NaN -> its own level."""
    blocks = [[] for _ in frames]
    for column, kind in kinds.items():
        if kind in ("numerical", "datetime"):
            series = [pd.to_numeric(f[column] if kind == "numerical" else f[column].astype("int64"), errors="coerce")
                      .astype(float) for f in frames]
            fill = series[0].mean()
            span = (series[0].max() - series[0].min()) or 1.0
            for b, s in zip(blocks, series):
                values = s.fillna(fill).to_numpy()
                b.append((values / span if scale_numerical else values)[:, None])
        elif kind == "categorical":
            as_text = [_as_text(f[column]) for f in frames]
            levels = sorted(set().union(*[set(a.unique()) for a in as_text]))
            for b, a in zip(blocks, as_text):
                b.append(pd.get_dummies(pd.Categorical(a, categories=levels)).to_numpy(dtype=float))
    return [np.hstack(b) if b else np.zeros((len(f), 0)) for b, f in zip(blocks, frames)]


def _tree_features(frames: Sequence[pd.DataFrame], kinds: dict) -> list[pd.DataFrame]:
    """Numerical as floats (NaN kept: xgboost routes it), categoricals as shared-level pandas categories."""
    out = [pd.DataFrame(index=range(len(f))) for f in frames]
    for column, kind in kinds.items():
        if kind == "id":
            continue
        if kind == "categorical":
            texts = [_as_text(f[column]).to_numpy() for f in frames]
            levels = sorted(set().union(*[set(t) for t in texts]))
            for o, t in zip(out, texts):
                o[column] = pd.Categorical(t, categories=levels)
        else:
            for o, f in zip(out, frames):
                values = f[column].astype("int64") if kind == "datetime" else f[column]
                o[column] = pd.to_numeric(values, errors="coerce").astype(float).to_numpy()
    return out


def _balanced(reference: pd.DataFrame, synthetic: pd.DataFrame, rng) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = min(len(reference), len(synthetic))
    pick = lambda f: f.iloc[np.sort(rng.choice(len(f), n, replace=False))].reset_index(drop=True)  # noqa: E731
    return pick(reference), pick(synthetic)


# --------------------------------------------------------------------------------------------
# Detection (xgboost), alpha/beta, DCR, MLE
# --------------------------------------------------------------------------------------------

def _xgb():
    return _require("xgboost")


def _detection_auc(reference, synthetic, kinds, seed: int, folds: int = 5) -> float:
    xgb = _xgb()
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    ref, syn = _balanced(reference, synthetic, np.random.default_rng(seed))
    x_ref, x_syn = _tree_features([ref, syn], kinds)
    X = pd.concat([x_ref, x_syn], ignore_index=True)
    y = np.r_[np.zeros(len(ref)), np.ones(len(syn))]
    aucs = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(X, y):
        model = xgb.XGBClassifier(n_estimators=200, max_depth=6, learning_rate=0.1, tree_method="hist",
                                  enable_categorical=True, random_state=seed, n_jobs=2)
        model.fit(X.iloc[train], y[train])
        aucs.append(roc_auc_score(y[test], model.predict_proba(X.iloc[test])[:, 1]))
    return float(np.mean(aucs))


def _nearest(queries: np.ndarray, points: np.ndarray, k: int = 1, p: float = 2.0, chunk: int = 1024):
    """Distances and indices of the ``k`` nearest ``points`` to each query (exact, chunked torch cdist:
    an order of magnitude faster than a KD-tree on one-hot rows)."""
    import torch

    q, pts = torch.from_numpy(np.ascontiguousarray(queries, np.float32)), torch.from_numpy(np.ascontiguousarray(points, np.float32))
    dists, index = [], []
    for i in range(0, len(q), chunk):
        d, j = torch.cdist(q[i:i + chunk], pts, p=p).topk(k, dim=1, largest=False)
        dists.append(d)
        index.append(j)
    return torch.cat(dists).double().numpy(), torch.cat(index).numpy()


def _alpha_beta(reference, synthetic, kinds, seed: int) -> tuple[float, float]:
    """synthcity's naive alpha-precision / beta-recall (30 alphas, centre = mean of the reference)."""
    ref, syn = _balanced(reference, synthetic, np.random.default_rng(seed))
    X, Y = _one_hot([ref, syn], kinds, scale_numerical=False)
    alphas = np.linspace(0, 1, 30)
    center = X.mean(0)
    radii = np.quantile(np.linalg.norm(X - center, axis=1), alphas)
    synth_center = Y.mean(0)
    synth_to_center = np.linalg.norm(Y - center, axis=1)
    real_to_real = _nearest(X, X, k=2)[0][:, 1]
    real_to_synth, nearest = _nearest(X, Y)
    real_to_synth, nearest = real_to_synth[:, 0], nearest[:, 0]
    closest_d = np.linalg.norm(Y[nearest] - synth_center, axis=1)
    closest_radii = np.quantile(closest_d, alphas)
    precision = np.array([np.mean(synth_to_center <= r) for r in radii])
    coverage = np.array([np.mean((real_to_synth <= real_to_real) & (closest_d <= r)) for r in closest_radii])
    step = alphas[1] - alphas[0]
    return (float(1 - 2 * np.abs(alphas - precision).sum() * step),
            float(1 - 2 * np.abs(alphas - coverage).sum() * step))


def _dcr_share(real_train, holdout, synthetic, kinds, seed: int) -> float:
    rng = np.random.default_rng(seed)
    train = real_train.iloc[np.sort(rng.choice(len(real_train), min(len(real_train), len(holdout)), replace=False))]
    t, h, s = _one_hot([train.reset_index(drop=True), holdout, synthetic], kinds, scale_numerical=True)
    to_train, to_holdout = _nearest(s, t, p=1.0)[0][:, 0], _nearest(s, h, p=1.0)[0][:, 0]
    return float(np.mean(to_train < to_holdout))


def _mle(train: pd.DataFrame, test: pd.DataFrame, target: str, kinds: dict, seed: int, grid: dict) -> tuple[str, float]:
    """The official protocol: the grid's best setting on a 1/9 validation split of ``train``, then
    that model's score on ``test`` (ROC AUC for a categorical target, RMSE for a numerical one)."""
    xgb = _xgb()
    from sklearn.metrics import mean_squared_error, roc_auc_score

    train, test = (f[f[target].notna()].reset_index(drop=True) for f in (train, test))   # no label, no score
    features = {c: k for c, k in kinds.items() if c != target}
    x_train, x_test = _one_hot([train, test], features, scale_numerical=False)
    classify = kinds[target] == "categorical"
    if classify:
        labels = sorted(set(train[target].dropna().astype(str)) | set(test[target].dropna().astype(str)))
        encode = lambda s: pd.Categorical(s.astype(str), categories=labels).codes  # noqa: E731
        y_train, y_test = encode(train[target]), encode(test[target])
    else:
        y_train, y_test = train[target].to_numpy(float), test[target].to_numpy(float)
    order = np.random.default_rng(seed).permutation(len(x_train))
    n_val = len(order) // 9
    val, fit = order[:n_val], order[n_val:]

    def score(model, X, y):
        if classify:
            proba = model.predict_proba(X)
            if len(labels) == 2:
                return roc_auc_score(y, proba[:, 1]) if len(np.unique(y)) > 1 else 0.5
            return roc_auc_score(np.eye(len(labels))[y], proba, average="micro")
        return -float(np.sqrt(mean_squared_error(y, model.predict(X))))

    best, best_score = None, -np.inf
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        params = dict(zip(keys, values))
        cls = xgb.XGBClassifier if classify else xgb.XGBRegressor
        model = cls(**params, tree_method="hist", random_state=seed, n_jobs=2)
        if classify and len(np.unique(y_train[fit])) < 2:
            return ("mle_auc", 0.5)
        model.fit(x_train[fit], y_train[fit])
        s = score(model, x_train[val], y_train[val])
        if s > best_score:
            best, best_score = params, s
    model = (xgb.XGBClassifier if classify else xgb.XGBRegressor)(**best, tree_method="hist", random_state=seed, n_jobs=2)
    model.fit(x_train[fit], y_train[fit])
    result = score(model, x_test, y_test)
    return ("mle_auc", float(result)) if classify else ("mle_rmse", -float(result))


def evaluate(real_train: pd.DataFrame, synthetic: pd.DataFrame, real_test: Optional[pd.DataFrame] = None,
             target: Optional[str] = None, *, metrics: Sequence[str] = METRICS, seed: int = 0,
             mle_grid: Optional[dict] = None) -> dict:
    """Score ``synthetic`` against the real data (see the module doc for each key).

    Args:
        real_train: the table the generator was trained on (defines the columns and their kinds).
        synthetic: the generated table (same columns; extra columns are ignored).
        real_test: held-out real rows: the reference of the fidelity metrics, the DCR holdout
            and the MLE test set.
        target: the column MLE predicts.
        metrics: a subset of ``METRICS``.
        mle_grid: xgboost settings to search (default: the official 36).
    """
    if not isinstance(real_train, pd.DataFrame) or len(real_train) == 0:
        raise ValueError("real_train: expected a non-empty pandas DataFrame")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown {unknown}; expected a subset of {METRICS}")
    real_train = real_train.reset_index(drop=True)
    synthetic = _aligned("synthetic", real_train, synthetic)
    if real_test is not None:
        real_test = _aligned("real_test", real_train, real_test)
    if target is not None and target not in real_train.columns:
        raise ValueError(f"target: {target!r} is not a column of real_train")
    kinds = {c: k for c, k in _kinds(real_train).items() if k != "id"}
    reference = real_test if real_test is not None else real_train
    out: dict = {}
    if "shape" in metrics or "trend" in metrics:
        shape, trend = _shape_trend(reference, synthetic, kinds)
        out.update({k: v for k, v in (("shape_error", shape), ("trend_error", trend)) if k.split("_")[0] in metrics})
    if "detection" in metrics:
        out["detection_auc"] = _detection_auc(reference, synthetic, kinds, seed)
    if "logistic_detection" in metrics:
        out["logistic_detection"] = _logistic_detection(real_train, synthetic, kinds)
    if "alpha_beta" in metrics:
        out["alpha_precision"], out["beta_recall"] = _alpha_beta(reference, synthetic, kinds, seed)
    if "dcr" in metrics and real_test is not None:
        out["dcr_share"] = _dcr_share(real_train, real_test, synthetic, kinds, seed)
    if "mle" in metrics and target is not None and real_test is not None:
        key, value = _mle(synthetic, real_test, target, kinds, seed, mle_grid or MLE_GRID)
        out[key] = value
    return out
