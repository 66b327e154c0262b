"""TabDiffSynthesizer end to end on tiny configs (seconds): schema round trip, degenerate tables,
determinism, save/load, resume after Ctrl-C, imputation and conditions, bad input."""

import os
import signal
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from diffkern.tabdiff import SchemaError, TabDiffConfig, TabDiffSynthesizer, datasets
from diffkern.tabdiff import synthesizer as synth_module
from diffkern.tabdiff.training import Trainer, TrainingError
from diffkern.tabdiff.transforms import TableTransform
from diffkern.tabdiff.schema import detect_schema

TINY = dict(dim_t=16, ffn_factor=2, batch_size=64, steps=4, guidance_dim_t=16, checkpoint_every=1,
            sample_batch_size=97)


def tiny(**overrides) -> TabDiffConfig:
    return TabDiffConfig(**{**TINY, "epochs": 2, **overrides})


def mixed_frame(n=120, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, n)
    income = np.round(rng.lognormal(10, 0.5, n), 2)
    income[rng.random(n) < 0.25] = np.nan
    color = pd.Categorical(rng.choice(["red", "green", "blue"], n))
    city = rng.choice(["Oslo", "Lima", None], n, p=[0.5, 0.3, 0.2]).astype(object)
    return pd.DataFrame({
        "age": age.astype("int32"),
        "income": income,
        "member": rng.random(n) < 0.4,
        "color": color,
        "city": city,
        "joined": pd.Timestamp("2020-01-01") + pd.to_timedelta(rng.integers(0, 900, n), unit="D"),
        "plan": pd.array(rng.choice(["a", "b"], n), dtype="string"),
        "country": "NO",
    })


@pytest.fixture(scope="module")
def fitted():
    df = mixed_frame()
    return df, TabDiffSynthesizer(tiny(epochs=3)).fit(df, seed=0, progress=False)


# ---- schema and transforms ---------------------------------------------------------------------

def test_detected_schema():
    kinds = {s.name: s.kind for s in detect_schema(mixed_frame())}
    assert kinds == {"age": "numerical", "income": "numerical", "member": "categorical", "color": "categorical",
                     "city": "categorical", "joined": "datetime", "plan": "categorical", "country": "categorical"}


def test_transform_round_trip_is_exact():
    df = mixed_frame()
    transform = TableTransform(detect_schema(df)).fit(df)
    x_num, x_cat, num_nan, cat_nan = transform.encode(df)
    back = transform.decode(x_num, x_cat)
    assert list(back.dtypes) == list(df.dtypes)
    for column in df.columns:
        if column == "income":
            np.testing.assert_allclose(back[column], df[column], rtol=1e-6)    # float32 model space; NaNs kept
        else:
            pd.testing.assert_series_equal(back[column], df[column], check_exact=True)


def test_samples_keep_dtypes_levels_ranges_and_nans(fitted):
    df, synth = fitted
    out = synth.sample(400, seed=1, progress=False)
    assert list(out.columns) == list(df.columns) and len(out) == 400
    assert list(out.dtypes) == list(df.dtypes)
    assert set(out["color"].cat.categories) == set(df["color"].cat.categories)
    assert set(out["city"].dropna()) <= {"Oslo", "Lima"} and set(out["plan"].dropna()) <= {"a", "b"}
    assert out["age"].between(df["age"].min(), df["age"].max()).all()
    assert out["income"].dropna().between(df["income"].min(), df["income"].max()).all()
    assert (out["joined"] >= df["joined"].min()).all() and (out["joined"] <= df["joined"].max()).all()
    assert (out["joined"] == out["joined"].dt.normalize()).all()           # day resolution kept
    assert (out["country"] == "NO").all()                                   # constant column
    assert out["income"].isna().any() and out["income"].notna().any()       # NaN modelled, not filled
    assert out["city"].isna().any()


def test_nan_rates_are_learned():
    """A model trained for real (a few seconds) reproduces a column's missing rate."""
    rng = np.random.default_rng(3)
    n = 600
    x = rng.normal(size=n)
    x[rng.random(n) < 0.3] = np.nan
    df = pd.DataFrame({"x": x, "y": rng.choice(["p", "q", None], n, p=[0.5, 0.4, 0.1]).astype(object)})
    synth = TabDiffSynthesizer(tiny(epochs=150, batch_size=200, steps=20)).fit(df, seed=0, progress=False)
    out = synth.sample(2000, seed=0, progress=False)
    for column in ("x", "y"):
        real, fake = df[column].isna().mean(), out[column].isna().mean()
        assert abs(fake - real) < 0.05, (column, real, fake)


@pytest.mark.parametrize("frame", [
    pd.DataFrame({"a": np.arange(50.0) % 7, "b": np.linspace(0, 1, 50)}),
    pd.DataFrame({"a": list("xyz") * 20, "b": [True, False] * 30}),
    pd.DataFrame({"a": list("xy") * 25, "k": 3.5}),
])
def test_degenerate_schemas(frame):
    out = TabDiffSynthesizer(tiny()).fit(frame, progress=False).sample(30, progress=False)
    assert list(out.dtypes) == list(frame.dtypes) and len(out) == 30
    if "k" in frame:
        assert (out["k"] == 3.5).all()


def test_id_like_and_high_cardinality_columns_are_refused_by_name():
    df = pd.DataFrame({"user_id": np.arange(100), "v": np.random.default_rng(0).normal(size=100)})
    with pytest.raises(SchemaError, match="user_id"):
        TabDiffSynthesizer(tiny()).fit(df, progress=False)
    df = pd.DataFrame({"email": [f"u{i}@x.org" for i in range(100)], "v": np.arange(100.0)})
    with pytest.raises(SchemaError, match="email"):
        TabDiffSynthesizer(tiny(max_categories=50)).fit(df, progress=False)
    # declared as an id, it comes back as fresh row numbers
    out = TabDiffSynthesizer(tiny(), schema={"email": "id"}).fit(df, progress=False).sample(5, progress=False)
    assert out["email"].tolist() == [0, 1, 2, 3, 4] or out["email"].nunique() == 5


def test_all_nan_column_is_refused_by_name():
    df = pd.DataFrame({"a": np.arange(20.0), "empty": np.nan})
    with pytest.raises((SchemaError, ValueError), match="empty"):
        TabDiffSynthesizer(tiny()).fit(df, progress=False)


# ---- determinism, save/load, resume -----------------------------------------------------------

def test_same_seed_same_table_any_batch_size(fitted):
    _, synth = fitted
    a = synth.sample(150, seed=4, progress=False)
    b = synth.sample(150, seed=4, batch_size=40, progress=False)
    c = synth.sample(150, seed=5, progress=False)
    pd.testing.assert_frame_equal(a, b)
    assert not a.equals(c)


def test_fit_is_deterministic():
    df = mixed_frame(60)
    runs = [TabDiffSynthesizer(tiny()).fit(df, seed=3, progress=False) for _ in range(2)]
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.equal(p, q)


def test_save_load_gives_identical_samples(fitted, tmp_path):
    _, synth = fitted
    path = synth.save(str(tmp_path / "m.tabdiff"))
    loaded = TabDiffSynthesizer.load(path)
    pd.testing.assert_frame_equal(loaded.sample(80, seed=2, progress=False), synth.sample(80, seed=2, progress=False))
    assert open(path, "rb").read(8) != b"\x80\x04\x95"                      # safetensors, not a pickle


def test_version_mismatch_warns(fitted, tmp_path, monkeypatch):
    _, synth = fitted
    monkeypatch.setattr(synth_module, "__version__", "0.0.0-other")
    path = synth.save(str(tmp_path / "old.tabdiff"))
    monkeypatch.undo()
    with pytest.warns(UserWarning, match="0.0.0-other"):
        TabDiffSynthesizer.load(path)


def test_resume_after_ctrl_c_equals_uninterrupted(tmp_path, monkeypatch):
    df = mixed_frame(150)
    cfg = tiny(epochs=3, batch_size=40)
    whole = TabDiffSynthesizer(cfg).fit(df, target="color", seed=1, progress=False)

    original = Trainer._run_batch
    calls = {"n": 0}

    def interrupting(self, idx, weight):
        original(self, idx, weight)
        calls["n"] += 1
        if calls["n"] == 6:                     # mid-epoch 2 of the main model
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Trainer, "_run_batch", interrupting)
    with pytest.raises(KeyboardInterrupt, match="checkpoint written"):
        TabDiffSynthesizer(cfg).fit(df, target="color", seed=1, progress=False, checkpoint_dir=str(tmp_path))
    monkeypatch.setattr(Trainer, "_run_batch", original)
    resumed = TabDiffSynthesizer(cfg).fit(df, target="color", seed=1, progress=False, checkpoint_dir=str(tmp_path),
                                          resume=str(tmp_path))
    for a, b in [(whole.model, resumed.model), (whole.guidance_model, resumed.guidance_model)]:
        for p, q in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(p, q)
    assert whole.history == resumed.history


def test_resume_refuses_another_table(tmp_path):
    df = mixed_frame(60)
    TabDiffSynthesizer(tiny()).fit(df, progress=False, checkpoint_dir=str(tmp_path))
    with pytest.raises(ValueError, match="resume"):
        TabDiffSynthesizer(tiny()).fit(mixed_frame(61), progress=False, resume=str(tmp_path))


def test_non_finite_loss_names_the_epoch(monkeypatch):
    from diffkern.tabdiff.diffusion import TabDiffModel

    def broken(self, x_num, x_cat, *args, **kwargs):
        z = sum(p.sum() for p in self.parameters()) * float("nan")
        return z, z

    monkeypatch.setattr(TabDiffModel, "loss", broken)
    with pytest.raises(TrainingError, match="epoch 1"):
        TabDiffSynthesizer(tiny()).fit(mixed_frame(40), progress=False)


# ---- imputation and conditions -----------------------------------------------------------------

def test_impute_leaves_observed_cells_unchanged(fitted):
    df, synth = fitted
    holed = df.head(40).copy()
    rng = np.random.default_rng(0)
    for column in ("age", "color", "joined", "plan"):
        holed.loc[rng.random(40) < 0.4, column] = None
    out = synth.impute(holed, seed=0, guidance=0, progress=False)
    assert out.index.equals(holed.index) and list(out.dtypes) == list(df.dtypes)
    for column in ("age", "color", "joined", "plan"):
        was = holed[column].notna()
        assert (out[column][was].astype(object) == holed[column][was].astype(object)).all(), column
        assert out[column].notna().all()                  # filled, never with the missing value
    # every NaN is a hole, whatever its origin: income's and city's are filled too
    for column in ("income", "city"):
        was = holed[column].notna()
        assert out[column][was].equals(holed[column][was]) and out[column].notna().all()
    pd.testing.assert_series_equal(out["member"], holed["member"])


def test_conditions_fix_columns(fitted):
    _, synth = fitted
    out = synth.sample(50, seed=0, conditions={"color": "red", "age": 30, "income": None}, progress=False)
    assert (out["color"] == "red").all() and (out["age"] == 30).all() and out["income"].isna().all()
    assert out["city"].nunique(dropna=False) > 1


def test_guidance_needs_a_target_model():
    df = mixed_frame(80)
    plain = TabDiffSynthesizer(tiny()).fit(df, progress=False)
    holed = df.assign(color=None)
    with pytest.raises(ValueError, match="guidance"):
        plain.impute(holed, guidance=0.6, progress=False)
    guided = TabDiffSynthesizer(tiny()).fit(df, target="color", progress=False)
    a = guided.impute(holed, guidance=0.6, seed=0, progress=False)
    b = guided.impute(holed, guidance=0.0, seed=0, progress=False)
    assert a["color"].notna().all() and b["color"].notna().all()
    assert not a["color"].equals(b["color"])


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call,error,match", [
    (lambda s, df: TabDiffSynthesizer(tiny()).fit(df.to_numpy()), TypeError, "data: expected a pandas DataFrame"),
    (lambda s, df: TabDiffSynthesizer(tiny()).fit(df.head(0)), ValueError, "data: expected a non-empty"),
    (lambda s, df: TabDiffSynthesizer(tiny()).fit(df, target="nope"), ValueError, "target: 'nope'"),
    (lambda s, df: s.sample(0), ValueError, "num_rows"),
    (lambda s, df: s.sample(5, conditions={"nope": 1}), ValueError, r"conditions: unknown columns \['nope'\]"),
    (lambda s, df: s.sample(5, conditions={"color": "purple"}), ValueError, "color"),
    (lambda s, df: s.sample(5, conditions={"age": None}), ValueError, "age"),
    (lambda s, df: s.impute(df.head(3).assign(color="purple").assign(age=None)), ValueError, "color"),
    (lambda s, df: s.impute(df.head(3).assign(extra=1)), ValueError, r"unknown columns \['extra'\]"),
    (lambda s, df: s.impute(df.head(0)), ValueError, "data: expected at least one row"),
    (lambda s, df: s.impute(df.head(3).to_dict()), TypeError, "data: expected a pandas DataFrame"),
    (lambda s, df: s.sample(5, seed=-1), ValueError, "seed"),
    (lambda s, df: s.sample(5, steps=1), ValueError, "steps"),
    (lambda s, df: TabDiffSynthesizer().sample(5), RuntimeError, "not fitted"),
    (lambda s, df: TabDiffSynthesizer.load("/nonexistent.tabdiff"), FileNotFoundError, "path"),
    (lambda s, df: TabDiffSynthesizer(tiny(), schema={"nope": "id"}).fit(df), ValueError, "nope"),
])
def test_bad_input_names_the_argument(fitted, call, error, match):
    df, synth = fitted
    with pytest.raises(error, match=match):
        call(synth, df)


def test_penguins_smoke():
    df = datasets.load_penguins()
    assert df.shape == (344, 8) and df["sex"].isna().sum() == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = TabDiffSynthesizer(tiny()).fit(df, target="species", progress=False).sample(20, progress=False)
    assert list(out.dtypes) == list(df.dtypes)
