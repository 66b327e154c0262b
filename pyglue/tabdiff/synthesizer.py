"""``TabDiffSynthesizer``: TabDiff behind a pandas API (fit, sample, conditions, impute, save/load).

    synth = TabDiffSynthesizer().fit(train_df, target="income", seed=0)
    fake = synth.sample(10_000, seed=1)                               # dtypes, labels, NaN rates kept
    rich = synth.sample(500, conditions={"income": ">50K"})           # fixed columns, no rejection
    filled = synth.impute(df_with_nans)                               # observed cells untouched
    synth.save("adult.tabdiff"); TabDiffSynthesizer.load("adult.tabdiff")
    synth.fit(train_df, nproc=4); synth.sample(10_000, nproc=4, batch_size=2_500)   # DDP, sharded rows
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import pandas as pd
import torch

from .. import __version__
from . import distributed
from .config import TabDiffConfig
from .diffusion import TabDiffModel
from .forecasting import ForecastConfig
from .sampler import Guidance, Observed, sample_rows
from .schema import ColumnSpec, Overrides, detect_schema
from .training import Trainer
from .transforms import TableTransform

ARTIFACT_FORMAT = "diffkern.tabdiff/1"
MAX_SEED = 2 ** 63


def _seed(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) < MAX_SEED:
        raise ValueError(f"{name}: expected an int in [0, 2**63), got {value!r}")
    return int(value)


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return int(value)


def _fingerprint(x_num: torch.Tensor, x_cat: torch.Tensor) -> str:
    """A cheap identity of the encoded training table (resume refuses another table)."""
    parts = [x_num.shape[0], x_num.shape[1], x_cat.shape[1], float(x_num.double().sum()),
             float((x_num.double() ** 2).sum()), int(x_cat.sum()), int((x_cat * x_cat).sum())]
    return json.dumps(parts)


class TabDiffSynthesizer:
    """Mixed-type tabular diffusion (TabDiff, ICLR 2025) for pandas DataFrames.

    Args:
        config: :class:`TabDiffConfig` (default: CPU-sized; ``TabDiffConfig.paper()`` is the official).
        schema: per-column overrides of the detected kinds, e.g. ``{"zip": "categorical", "id": "id"}``.
    """

    def __init__(self, config: Optional[TabDiffConfig] = None, *, schema: Optional[Overrides] = None):
        if config is not None and not isinstance(config, TabDiffConfig):
            raise TypeError(f"config: expected a TabDiffConfig, got {type(config).__name__}")
        self.config = config or TabDiffConfig()
        self.overrides = dict(schema or {})
        self.schema: Optional[list[ColumnSpec]] = None
        self.transform: Optional[TableTransform] = None
        self.model: Optional[TabDiffModel] = None
        self.guidance_model: Optional[TabDiffModel] = None
        self.target: Optional[str] = None
        self.history: list[dict] = []
        self.step_losses: list[dict] = []    # the main model's loss at every optimiser step of the last fit
        self.train_seconds: float = 0.0

    def __repr__(self) -> str:
        if self.schema is None:
            return "TabDiffSynthesizer(unfitted)"
        kinds = {}
        for s in self.schema:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        return (f"TabDiffSynthesizer({len(self.schema)} columns {kinds}, target={self.target!r}, "
                f"epochs={len(self.history)}, guidance_model={self.guidance_model is not None})")

    # ---- fit ---------------------------------------------------------------------------------

    def _new_model(self, n: int, num_classes, *, guidance_model=False, fixed_rho=None, fixed_k=None, seed=0):
        cfg = self.config
        if not cfg.learnable_schedules and not guidance_model:
            fixed_rho, fixed_k = [7.0] * n, [1.0] * len(num_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return TabDiffModel(n, num_classes, cfg.network_kwargs(guidance_model), cfg.schedule_kwargs(),
                                fixed_rho=fixed_rho, fixed_k=fixed_k)

    def _target_column(self, target: Optional[str]) -> Optional[tuple[str, int]]:
        """(kind "num"/"cat", index in the model layout) of the target column."""
        if target is None:
            return None
        spec = self.transform.spec(target)
        if spec.kind == "categorical":
            return "cat", self.transform.cat_columns.index(target)
        if spec.kind in ("numerical", "datetime") and target in self.transform.num_columns:
            return "num", self.transform.num_columns.index(target)
        raise ValueError(f"target: column {target!r} ({spec.kind}{', constant' if spec.kind != 'id' else ''}) "
                         "cannot be a guidance target")

    def fit(self, data: pd.DataFrame, target: Optional[str] = None, epochs: Optional[int] = None, seed: int = 0, *,
            checkpoint_dir: Optional[str] = None, resume: Optional[str] = None, progress: bool = True,
            nproc: Optional[int] = None) -> "TabDiffSynthesizer":
        """Learn the table. ``target`` also trains the unconditional model of that column that
        classifier-free guidance needs (``guidance > 0`` in :meth:`impute` / conditional sampling).

        ``checkpoint_dir`` gets a checkpoint every ``config.checkpoint_every`` epochs and on Ctrl-C;
        ``resume=`` (that directory) continues the run exactly where it stopped.
        ``nproc=N`` trains with DDP on N local processes (gloo), each on a slice of every batch;
        inside a torchrun process group ``fit`` does so on its own. Either way the run matches one
        process to float rounding (:mod:`diffkern.tabdiff.distributed`).
        """
        nproc = distributed.nproc_argument(nproc)
        seed = _seed("seed", seed)
        epochs = self.config.epochs if epochs is None else _positive("epochs", epochs)
        self.schema = detect_schema(data, self.overrides, self.config.max_categories)
        if target is not None and target not in [s.name for s in self.schema]:
            raise ValueError(f"target: {target!r} is not a column of the data (columns: {list(data.columns)})")
        frame = data.rename(columns=str)
        self.transform = TableTransform(self.schema).fit(frame)
        x_num, x_cat, _, _ = self.transform.encode(frame, fill_seed=seed)
        if x_num.shape[1] + x_cat.shape[1] == 0:
            raise ValueError("data: nothing to model: every column is constant or an id")
        if nproc > 1 and not distributed.active():
            fit_kwargs = dict(target=target, epochs=epochs, seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
                              progress=progress)
            self.__dict__.update(distributed.fit_in_processes(self, data, nproc, x_num.shape[0], fit_kwargs).__dict__)
            return self
        self.target = target
        target_slot = self._target_column(target)
        started = time.perf_counter()
        self.model = self._run_training(
            self._new_model(x_num.shape[1], self.transform.num_classes, seed=seed), x_num, x_cat, seed, epochs,
            checkpoint_dir, resume, progress, "fitting TabDiff")
        self.history, self.step_losses = self._last_history, self._last_step_losses
        self.guidance_model = None
        if target_slot is not None:
            self.guidance_model = self._fit_guidance(target_slot, x_num, x_cat, seed, checkpoint_dir, resume, progress)
        self.train_seconds = time.perf_counter() - started
        return self

    def _run_training(self, model, x_num, x_cat, seed, epochs, checkpoint_dir, resume, progress, desc):
        metadata = {"fingerprint": _fingerprint(x_num, x_cat), "epochs": epochs}
        trainer = Trainer(model, self.config, x_num, x_cat, seed=seed, epochs=epochs, checkpoint_dir=checkpoint_dir,
                          metadata=metadata, progress=progress, desc=desc)
        if resume is not None:
            state = Trainer.read_checkpoint(resume)
            if state["metadata"].get("fingerprint") != metadata["fingerprint"] or state["epochs"] != epochs:
                raise ValueError(f"resume: the checkpoint in {resume!r} was written for another table or epoch count "
                                 f"({state['epochs']} epochs); pass the same data, epochs and config")
            trainer.load_state_dict(state, resume)
        trainer.run()
        self._last_history, self._last_step_losses = trainer.history, trainer.step_losses
        return trainer.ema.eval()

    def _fit_guidance(self, target_slot, x_num, x_cat, seed, checkpoint_dir, resume, progress):
        """The official ``y_only`` model: the target column alone, no MLP trunk, ``dim_t`` 128; a
        categorical target uses the fixed k = 1 masking (the official code ignores the learned k
        there), a numerical one the main model's learned rho of that column."""
        kind, index = target_slot
        if kind == "cat":
            y_num, y_cat = x_num[:, :0], x_cat[:, index:index + 1]
            model = self._new_model(0, [self.transform.num_classes[index]], guidance_model=True, fixed_rho=[],
                                    fixed_k=[1.0], seed=seed + 1)
        else:
            rho = float(self.model.num_schedule.rho()[index])
            y_num, y_cat = x_num[:, index:index + 1], x_cat[:, :0]
            model = self._new_model(1, [], guidance_model=True, fixed_rho=[rho], fixed_k=[], seed=seed + 1)
        sub = lambda path: os.path.join(path, "guidance") if path else None  # noqa: E731
        resume_dir = sub(resume)
        if resume_dir is not None and not os.path.exists(resume_dir):
            resume_dir = None                          # interrupted before the guidance phase began
        return self._run_training(model, y_num, y_cat, seed + 1, self.config.guidance_epochs or len(self.history),
                                  sub(checkpoint_dir), resume_dir, progress, "fitting the guidance model")

    # ---- sample ------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self.model is None:
            raise RuntimeError("this synthesizer is not fitted: call fit(df) or TabDiffSynthesizer.load(path)")

    def _guidance(self, guidance: Optional[float], sampled_target: bool) -> Optional[Guidance]:
        if guidance is None:
            guidance = self.config.guidance if self.guidance_model is not None else 0.0
        guidance = float(guidance)
        if not math.isfinite(guidance) or guidance < 0:
            raise ValueError(f"guidance: expected a finite weight >= 0, got {guidance}")
        if guidance > 0.0 and self.guidance_model is None:
            raise ValueError("guidance: this synthesizer was fit without target=, so it has no unconditional model "
                             "for classifier-free guidance; pass guidance=0 or refit with fit(df, target=...)")
        if guidance == 0.0 or not sampled_target:
            return None
        kind, index = self._target_column(self.target)
        return Guidance(self.guidance_model, guidance, index, kind)

    def _run_sampler(self, num_rows, seed, batch_size, steps, observed=None, guidance=None, banned=(),
                     progress=True, desc="sampling", nproc=None, forecast=None):
        cfg = self.config
        seed = _seed("seed", seed)
        batch_size = cfg.sample_batch_size if batch_size is None else _positive("batch_size", batch_size)
        steps = cfg.steps if steps is None else _positive("steps", steps)
        if steps < 2:
            raise ValueError(f"steps: expected >= 2, got {steps}")
        nproc = distributed.nproc_argument(nproc)
        if nproc > 1 and not distributed.active():
            kwargs = dict(num_rows=num_rows, seed=seed, batch_size=batch_size, steps=steps, observed=observed,
                          guidance=guidance, banned=banned, progress=progress, desc=desc, forecast=forecast)
            return distributed.sample_in_processes(self, nproc, num_rows, batch_size, kwargs)
        # in a process group each process samples its run of whole batches; all get the whole table
        rank, size = distributed.world()
        start, stop = distributed.batch_aligned_range(num_rows, batch_size, rank, size)
        x_num, x_cat = torch.zeros(0, self.model.n_num), torch.zeros(0, len(self.model.num_classes), dtype=torch.int64)
        if stop > start:
            x_num, x_cat = sample_rows(
                self.model, stop - start, seed=seed, batch_size=batch_size, steps=steps, stochastic=cfg.stochastic,
                heun=cfg.heun, churn=cfg.churn, row_start=start, guidance=guidance, banned_logits=banned,
                observed=None if observed is None else observed.rows(start, stop), progress=progress and rank == 0,
                desc=desc, forecast=forecast)
        return distributed.all_gather_rows(x_num, x_cat)

    def _decode(self, x_num, x_cat) -> pd.DataFrame:
        return self.transform.decode(x_num, x_cat, clip=self.config.clip, round_integers=self.config.round_integers)

    def sample(self, num_rows: int, *, seed: int = 0, batch_size: Optional[int] = None, steps: Optional[int] = None,
               conditions: Optional[Mapping[str, Any]] = None, guidance: Optional[float] = None,
               progress: bool = True, nproc: Optional[int] = None,
               forecast: Optional[ForecastConfig] = None) -> pd.DataFrame:
        """``num_rows`` synthetic rows. The table depends only on (model, seed, num_rows, steps, forecast).

        ``nproc=N`` shares whole batches of rows among N local processes (the same table, bit for
        bit); inside a torchrun process group each process samples its share and every process
        returns the whole table. Numerically the table is batch-size invariant to float rounding
        only: CPU kernels round differently for different batch shapes.

        ``conditions={column: value}`` fixes columns in every row (``None`` asks for a missing
        value where the column had them); the rest is sampled jointly, with no rejection.
        ``guidance`` weights classifier-free guidance of the target column (default 0.6 when a
        guidance model was trained, else 0). ``forecast``: a ``SpectrumConfig``, ``TaylorSeerConfig``
        or ``FORAConfig`` (from ``diffkern.forecast``) whose ``num_steps`` equals ``steps``: its
        forecast steps skip the denoiser's trunk (see ``diffkern.tabdiff.forecasting``)."""
        self._require_fitted()
        num_rows = _positive("num_rows", num_rows)
        if conditions:
            known, missing = self._conditions_frame(conditions, num_rows)
            return self._impute(known, seed, batch_size, steps, guidance, progress, "conditional sampling", missing,
                                nproc, forecast)
        x_num, x_cat = self._run_sampler(num_rows, seed, batch_size, steps, progress=progress, nproc=nproc,
                                         forecast=forecast)
        return self._decode(x_num, x_cat)

    def _conditions_frame(self, conditions: Mapping[str, Any], num_rows: int) -> tuple[pd.DataFrame, list[str]]:
        """The conditions as a frame to impute, and the numerical columns asked to be missing."""
        if not isinstance(conditions, Mapping):
            raise TypeError(f"conditions: expected a dict {{column: value}}, got {type(conditions).__name__}")
        names = [s.name for s in self.schema]
        unknown = [c for c in conditions if str(c) not in names]
        if unknown:
            raise ValueError(f"conditions: unknown columns {unknown} (columns: {names})")
        frame = pd.DataFrame({s.name: pd.Series([None] * num_rows, dtype=object) for s in self.schema})
        missing = []
        for column, value in conditions.items():
            spec = self.transform.spec(str(column))
            if value is None or (isinstance(value, float) and math.isnan(value)):
                if not spec.nullable:
                    raise ValueError(f"conditions: column {column!r} had no missing values in training, so it "
                                     "cannot be conditioned on being missing")
                missing.append(spec.name)
                if spec.kind == "categorical":       # the NaN level is an observed category
                    frame[spec.name] = pd.Series([np.nan] * num_rows, dtype=object)
                continue
            if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
                raise TypeError(f"conditions: column {column!r} takes one value for every row, got "
                                f"{type(value).__name__}; for per-row values use impute(df)")
            frame[spec.name] = pd.Series([value] * num_rows, dtype=object)
        for spec in self.schema:
            if spec.kind == "datetime" and spec.name in conditions and conditions[spec.name] is not None:
                frame[spec.name] = pd.to_datetime(frame[spec.name])
        return frame, missing

    def impute(self, data: pd.DataFrame, *, seed: int = 0, batch_size: Optional[int] = None,
               steps: Optional[int] = None, guidance: Optional[float] = None, progress: bool = True,
               nproc: Optional[int] = None, forecast: Optional[ForecastConfig] = None) -> pd.DataFrame:
        """Fill the NaN cells of ``data`` (any subset of columns; absent columns are filled entirely)
        by RePaint-style conditional sampling; observed cells are returned unchanged. Filled
        cells never take the missing value. The target column is guided by ``guidance`` (its
        unconditional model always runs real). ``nproc`` and ``forecast`` as in :meth:`sample`."""
        return self._impute(data, seed, batch_size, steps, guidance, progress, "imputing", [], nproc, forecast)

    def _impute(self, data, seed, batch_size, steps, guidance, progress, desc, condition_missing,
                nproc=None, forecast=None) -> pd.DataFrame:
        self._require_fitted()
        if not isinstance(data, pd.DataFrame):
            raise TypeError(f"data: expected a pandas DataFrame, got {type(data).__name__}")
        if len(data) == 0:
            raise ValueError("data: expected at least one row to impute")
        names = [s.name for s in self.schema]
        frame = data.rename(columns=str)
        unknown = [c for c in frame.columns if c not in names]
        if unknown:
            raise ValueError(f"data: unknown columns {unknown} (the fitted schema has {names})")
        full = frame.reindex(columns=names)
        for spec in self.schema:
            if spec.kind == "datetime" and not pd.api.types.is_datetime64_any_dtype(full[spec.name].dtype):
                full[spec.name] = pd.to_datetime(full[spec.name])
        x_num, x_cat, num_nan, cat_nan = self.transform.encode(full, argument="data")
        banned = self._fill_not_missing(x_cat, cat_nan, num_nan, condition_missing)
        observed = Observed(x_num=torch.where(num_nan, torch.zeros_like(x_num), x_num), x_cat=x_cat,
                            num_missing=num_nan, cat_missing=cat_nan)
        sampled_target = self._target_sampled(num_nan, cat_nan)
        z_num, z_cat = self._run_sampler(len(full), seed, batch_size, steps, observed,
                                         self._guidance(guidance, sampled_target), banned, progress, desc, nproc,
                                         forecast)
        filled = self._decode(z_num, z_cat)
        return self._merge(frame, filled, data)

    def _fill_not_missing(self, x_cat, cat_nan, num_nan, condition_missing) -> list[int]:
        """Imputed cells take a value, not the missing one: a nullable numerical cell to fill has
        its missing flag observed as 0 (the filled flags were set to "missing" by encode), and a
        nullable categorical column's NaN level is ruled out. Returns the banned logit indices."""
        cats = self.transform.cat_columns
        n_flags = len(self.transform.missing_flags)
        for k, name in enumerate(self.transform.missing_flags):
            j = len(cats) - n_flags + k
            if name in condition_missing:
                x_cat[:, j] = 1
            else:
                x_cat[:, j] = 0                       # present: the value is observed or imputed
        banned, start = [], 0
        for j, k in enumerate(self.transform.num_classes):
            name = cats[j]
            if j < len(cats) - n_flags:
                if name in condition_missing:
                    cat_nan[:, j] = False                  # asked for the NaN level: observed
                elif self.transform.spec(name).nullable and bool(cat_nan[:, j].any()):
                    banned.append(start + k - 1)           # the NaN level (last real class)
            start += k + 1
        return banned

    def _target_sampled(self, num_nan, cat_nan) -> bool:
        if self.target is None:
            return False
        kind, index = self._target_column(self.target)
        return bool((cat_nan if kind == "cat" else num_nan)[:, index].any())

    def _merge(self, frame: pd.DataFrame, filled: pd.DataFrame, original: pd.DataFrame) -> pd.DataFrame:
        """The input with its NaN cells (and absent columns) taken from ``filled``; observed cells and
        their dtypes untouched where the column was given."""
        out = {}
        for spec in self.schema:
            name = spec.name
            if name not in frame.columns:
                out[name] = filled[name]
                continue
            given = frame[name].reset_index(drop=True)
            mask = given.isna()
            if not mask.any():
                out[name] = given
            else:
                merged = given.astype(object).where(~mask, filled[name].astype(object))
                out[name] = self.transform._restore(spec, merged) if spec.kind != "datetime" else \
                    pd.to_datetime(merged)
        result = pd.DataFrame(out)
        result.index = original.index
        return result

    # ---- save / load -------------------------------------------------------------------------

    def save(self, path: str) -> str:
        """One safetensors file: EMA weights, learned schedules, the guidance model, fitted
        transforms, schema, config and the package version (JSON metadata; no pickle)."""
        from safetensors.torch import save_file

        self._require_fitted()
        tensors = {f"model.{k}": v.contiguous() for k, v in self.model.state_dict().items()}
        if self.guidance_model is not None:
            tensors.update({f"guidance.{k}": v.contiguous() for k, v in self.guidance_model.state_dict().items()})
        tensors.update({f"transform.{k}": torch.from_numpy(v) for k, v in self.transform.arrays().items()})
        meta = {
            "format": ARTIFACT_FORMAT, "version": __version__, "config": self.config.to_dict(),
            "schema": [s.to_dict() for s in self.schema], "transform": self.transform.json_state(),
            "target": self.target, "history": self.history, "train_seconds": self.train_seconds,
            "layout": {"n_num": self.model.n_num, "num_classes": self.model.num_classes,
                       "guidance": None if self.guidance_model is None else
                       {"n_num": self.guidance_model.n_num, "num_classes": self.guidance_model.num_classes,
                        "rho": self.guidance_model.num_schedule.rho().tolist(),
                        "k": self.guidance_model.cat_schedule.k().tolist()}},
        }
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file(tensors, path, metadata={"diffkern": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str) -> "TabDiffSynthesizer":
        from safetensors import safe_open

        if not os.path.exists(path):
            raise FileNotFoundError(f"path: no TabDiff artifact at {path!r}")
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("diffkern")
            if raw is None:
                raise ValueError(f"path: {path!r} is a safetensors file but not a diffkern TabDiff artifact")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(raw)
        if meta.get("format") != ARTIFACT_FORMAT:
            raise ValueError(f"path: unknown artifact format {meta.get('format')!r} (expected {ARTIFACT_FORMAT})")
        if meta["version"] != __version__:
            warnings.warn(f"{path}: saved with diffkern {meta['version']}, loading with {__version__}; "
                          "samples may differ", stacklevel=2)
        synth = cls(TabDiffConfig.from_dict(meta["config"]))
        synth.schema = [ColumnSpec.from_dict(s) for s in meta["schema"]]
        arrays = {k[len("transform."):]: v.numpy() for k, v in tensors.items() if k.startswith("transform.")}
        synth.transform = TableTransform.from_state(synth.schema, meta["transform"], arrays)
        synth.target, synth.history, synth.train_seconds = meta["target"], meta["history"], meta["train_seconds"]
        layout = meta["layout"]
        synth.model = synth._new_model(layout["n_num"], layout["num_classes"])
        synth.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        synth.model.eval()
        g = layout["guidance"]
        if g is not None:
            synth.guidance_model = synth._new_model(g["n_num"], g["num_classes"], guidance_model=True,
                                                    fixed_rho=g["rho"], fixed_k=g["k"])
            synth.guidance_model.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("guidance.")})
            synth.guidance_model.eval()
        return synth
