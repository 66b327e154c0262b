"""TabDiff's tools: the evaluation harness, the datasets, the ``diffkern tabdiff`` command line and
``diffkern demo tabdiff --quick`` on the shipped model."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from diffkern.cli import main as diffkern_main
from diffkern.tabdiff import datasets

pytest.importorskip("sdmetrics")
pytest.importorskip("xgboost")
from diffkern.tabdiff.evaluate import evaluate  # noqa: E402


@pytest.fixture(scope="module")
def penguins():
    df = datasets.load_penguins()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(df))
    return df.iloc[order[:230]].reset_index(drop=True), df.iloc[order[230:]].reset_index(drop=True)


def _independent(df, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({c: df[c].to_numpy()[rng.permutation(len(df))] for c in df.columns})


def test_evaluate_orders_real_above_independent(penguins):
    train, test = penguins
    metrics = ["shape", "trend", "detection", "alpha_beta", "dcr"]
    real = evaluate(train, train, test, metrics=metrics)
    shuffled = evaluate(train, _independent(train), test, metrics=metrics)
    assert set(real) == {"shape_error", "trend_error", "detection_auc", "alpha_precision", "beta_recall", "dcr_share"}
    assert shuffled["trend_error"] > real["trend_error"] + 5            # broken correlations are seen ...
    assert abs(shuffled["shape_error"] - real["shape_error"]) < 1e-9    # ... with the marginals unchanged
    assert shuffled["detection_auc"] > real["detection_auc"] + 0.1
    # copies of the training rows sit at distance 0 from the training half (subsampled to the
    # holdout's size, so about half of them): far above the 0.5 of new rows
    assert real["dcr_share"] > 0.7 and abs(shuffled["dcr_share"] - 0.5) < 0.15
    assert evaluate(train, train, test, metrics=metrics) == real        # deterministic


def test_evaluate_mle_and_logistic(penguins):
    train, test = penguins
    grid = dict(n_estimators=[10], min_child_weight=[1], max_depth=[3], gamma=[0.0])
    scores = evaluate(train, train, test, target="sex", metrics=["mle", "logistic_detection"], mle_grid=grid)
    assert 0.8 < scores["mle_auc"] <= 1.0
    assert 0.5 < scores["logistic_detection"] <= 1.0
    rmse = evaluate(train, train, test, target="body_mass_g", metrics=["mle"], mle_grid=grid)["mle_rmse"]
    assert 100 < rmse < 800


@pytest.mark.parametrize("kwargs,match", [
    (dict(metrics=["nope"]), "metrics: unknown"),
    (dict(target="nope"), "target: 'nope'"),
])
def test_evaluate_bad_input(penguins, kwargs, match):
    train, test = penguins
    with pytest.raises(ValueError, match=match):
        evaluate(train, train, test, **kwargs)
    with pytest.raises(ValueError, match="synthetic"):
        evaluate(train, train.drop(columns="sex"), test)
    with pytest.raises(ValueError, match="real_train"):
        evaluate(train.head(0), train)


def test_datasets_ship_offline():
    train, test = datasets.load_adult()
    assert train.shape == (32561, 15) and test.shape == (16281, 15)
    assert set(test["income"].unique()) == {"<=50K", ">50K"}
    assert train["workclass"].isna().sum() == 1836                      # '?' read as missing
    wage = datasets.load_wage()
    assert wage.shape[0] == 3000 and "logwage" in wage


def test_command_line_round_trip(tmp_path, penguins, capsys):
    train, test = penguins
    real_csv, model = str(tmp_path / "train.csv"), str(tmp_path / "m.tabdiff")
    train.to_csv(real_csv, index=False)
    config = json.dumps(dict(dim_t=16, ffn_factor=2, batch_size=64, steps=4, guidance_dim_t=16))
    assert diffkern_main(["tabdiff", "fit", real_csv, "-o", model, "--epochs", "2", "--target", "species",
                          "--config", config]) == 0
    out_csv = str(tmp_path / "fake.csv")
    assert diffkern_main(["tabdiff", "sample", model, "-n", "30", "-o", out_csv, "--condition", "island=Biscoe",
                          "--condition", "year=2008"]) == 0
    fake = pd.read_csv(out_csv)
    assert len(fake) == 30 and (fake["island"] == "Biscoe").all() and (fake["year"] == 2008).all()
    holed_csv, filled_csv = str(tmp_path / "holed.csv"), str(tmp_path / "filled.csv")
    test.head(10).assign(species=None).to_csv(holed_csv, index=False)
    assert diffkern_main(["tabdiff", "impute", model, holed_csv, "-o", filled_csv]) == 0
    assert pd.read_csv(filled_csv)["species"].notna().all()
    assert diffkern_main(["tabdiff", "evaluate", real_csv, out_csv, "--metrics", "shape,trend"]) == 0
    assert "shape_error" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown column 'nope'"):
        diffkern_main(["tabdiff", "sample", model, "-n", "3", "-o", out_csv, "--condition", "nope=1"])


def test_demo_quick_on_the_shipped_model(tmp_path):
    from diffkern.tabdiff.shipped import shipped_path

    if not os.path.exists(shipped_path("adult", must_exist=False)):
        pytest.fail("the shipped Adult model is missing: run scripts/train_tabdiff.py")
    report = str(tmp_path / "r.json")
    assert diffkern_main(["demo", "tabdiff", "--quick", "--json", report, "--png", str(tmp_path / "p.png")]) == 0
    rows = json.load(open(report))["rows"]
    assert [r["method"] for r in rows] == ["tabdiff", "independent"]
    assert set(rows[0]) >= {"method", "table", "shape_error", "trend_error", "detection_auc", "logistic_detection",
                            "alpha_precision", "beta_recall", "dcr_share", "mle_auc", "train_seconds",
                            "sample_seconds"}
    # even on 2,000 rows and 10 steps, the model's pairwise trends beat independent marginals
    assert rows[0]["trend_error"] < rows[1]["trend_error"]
    assert os.path.getsize(str(tmp_path / "p.png")) > 10_000
