"""The PoE-Bridge study behind ``diffkern demo poe-bridge``: every method on the same held-out
problems and seeds, per-problem counters, pooled metrics with intervals, and the issue's claims
checked with a paired bootstrap over problems.

Methods (JSON keys): ``ar``; ``dlm-1``/``dlm-2``/``dlm-4`` (confidence-ordered DLM decoding, k
tokens per forward) and ``dlm-matched`` (the smallest k whose DLM forwards do not exceed the
default PoE-Bridge's); ``speculative`` (w = 0, K = 1); ``is-only`` (w = 1, top-p 1: importance
sampling alone); ``poe-bridge`` over the sweep w x K; ``official`` (parity weights, argmax
selection); the ablations ``poe-bridge-no-mixed-temp`` (every particle at T) and
``poe-bridge-no-elastic`` (W = M: one verification window per DLM forward).

Every metric is a ratio of sums over problems (and seeds): accuracy = correct / problems,
acceptance = accepted / drafted, ESS/K = sum of per-window ESS/K / windows, AR-NLL = NLL /
generated tokens (under the AR model at T = 1). The paired bootstrap resamples problems (each
problem keeps all its seeds) with the same indices for every method a claim compares.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from .baselines import ar_generate, dlm_generate, is_only_generate, speculative_generate
from .config import PoEBridgeConfig
from .decoder import GenerationOutput, PoEBridgeDecoder

FIELDS = ("correct", "dlm_forwards", "ar_forwards", "tokens", "drafted", "accepted", "ess_over_k", "windows",
          "nll")
#: metric -> (numerator field, denominator field; None = number of problems)
METRICS = {"accuracy": ("correct", None), "dlm_forwards": ("dlm_forwards", None),
           "ar_forwards": ("ar_forwards", None), "tokens_per_dlm_forward": ("tokens", "dlm_forwards"),
           "acceptance": ("accepted", "drafted"), "ess_over_k": ("ess_over_k", "windows"),
           "ar_nll": ("nll", "tokens")}
WEIGHTS = (0.0, 0.3, 0.5, 0.7, 1.0)
PARTICLES = (1, 4, 8)


@dataclass
class Setting:
    """One method configuration: its JSON key, knobs and how to run a batch of prompts."""

    method: str
    weight: Optional[float]
    particles: Optional[int]
    run: Callable[[List[List[int]], int], GenerationOutput]     # (prompts, seed) -> output
    backend: str = "auto"
    extra: Dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.weight is not None and self.method not in ("speculative",):
            parts.append(f"w={self.weight:g}")
        if self.particles is not None and self.method not in ("speculative",):
            parts.append(f"K={self.particles}")
        if "tokens_per_step" in self.extra and self.method == "dlm-matched":
            parts.append(f"k={self.extra['tokens_per_step']}")
        if self.backend == "reference":
            parts.append("[reference]")
        return " ".join(parts)


@dataclass
class Measured:
    """Per-problem counters of one setting: ``per_seed[s][field]`` arrays [N], ``seconds[s]``."""

    setting: Setting
    per_seed: Dict[int, Dict[str, np.ndarray]] = field(default_factory=dict)
    seconds: Dict[int, float] = field(default_factory=dict)

    def totals(self) -> Dict[str, np.ndarray]:
        """Per-problem totals over the seeds (a pooled ratio of sums only needs these)."""
        seeds = sorted(self.per_seed)
        return {f: sum(self.per_seed[s][f] for s in seeds) for f in FIELDS}

    @property
    def num_seeds(self) -> int:
        return len(self.per_seed)


# ---------------------------------------------------------------------------------------------
# Running one setting
# ---------------------------------------------------------------------------------------------

def ar_nll(target_model, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]]) -> List[float]:
    """Per problem, the sum of -log p_AR(token | prefix) at T = 1 over the generated tokens."""
    seqs = [list(p) + list(g) for p, g in zip(prompts, generations)]
    L = max(map(len, seqs))
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    am = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        am[i, : len(s)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(target_model(input_ids=ids, attention_mask=am).logits.float(), -1)
    out = []
    for i, (p, g) in enumerate(zip(prompts, generations)):
        pos = torch.arange(len(p) - 1, len(p) + len(g) - 1)
        out.append(float(-logp[i, pos, torch.tensor(list(g), dtype=torch.long)].sum()) if g else 0.0)
    return out


def per_problem(output: GenerationOutput, correct: Sequence[bool], nll: Sequence[float],
                particles: Optional[int]) -> Dict[str, np.ndarray]:
    st = output.stats
    K = particles or 1
    return {"correct": np.array(correct, dtype=float),
            "dlm_forwards": np.array(st.seq_dlm_forwards, dtype=float),
            "ar_forwards": np.array(st.seq_ar_forwards, dtype=float),
            "tokens": np.array([len(s) for s in output.sequences], dtype=float),
            "drafted": np.array(st.seq_drafted, dtype=float),
            "accepted": np.array(st.seq_accepted, dtype=float),
            "ess_over_k": np.array([sum(e) / K for e in st.seq_ess], dtype=float),
            "windows": np.array([len(e) for e in st.seq_ess], dtype=float),
            "nll": np.array(nll, dtype=float)}


def measure(setting: Setting, spec, tokenizer, target_model, problems, prompts, seeds: Sequence[int],
            batch_size: int, progress: bool = True) -> Measured:
    """Run ``setting`` on every problem for every seed, in batches of ``batch_size``."""
    import diffkern
    from tqdm.auto import tqdm
    out = Measured(setting)
    for seed in seeds:
        parts, seconds = [], 0.0
        starts = range(0, len(prompts), batch_size)
        for s in tqdm(starts, desc=f"{setting.label} seed {seed}", leave=False, disable=not progress):
            batch = prompts[s: s + batch_size]
            t0 = time.perf_counter()
            if setting.backend == "reference":
                with diffkern.use_backend("reference"):
                    gen = setting.run(batch, seed * 100_003 + s)
            else:
                gen = setting.run(batch, seed * 100_003 + s)
            seconds += time.perf_counter() - t0
            correct = spec.score(tokenizer, problems[s: s + batch_size], gen.sequences)
            parts.append(per_problem(gen, correct, ar_nll(target_model, batch, gen.sequences), setting.particles))
        out.per_seed[seed] = {f: np.concatenate([p[f] for p in parts]) for f in FIELDS}
        out.seconds[seed] = seconds
    return out


# ---------------------------------------------------------------------------------------------
# The settings
# ---------------------------------------------------------------------------------------------

def poe_setting(method: str, draft, target, cfg: PoEBridgeConfig, eos: int, backend: str = "auto",
                **extra) -> Setting:
    if method == "is-only":
        run = lambda p, s: is_only_generate(draft, target, p, config=cfg, seed=s, eos_token_id=eos)  # noqa: E731
    elif method == "speculative":
        run = lambda p, s: speculative_generate(draft, target, p, config=cfg, seed=s, eos_token_id=eos)  # noqa: E731
    else:
        decoder = PoEBridgeDecoder(draft, target, cfg)
        run = lambda p, s: decoder.generate(p, seed=s, eos_token_id=eos)  # noqa: E731
    particles = 1 if method == "speculative" else cfg.num_particles
    weight = {"speculative": 0.0, "is-only": 1.0}.get(method, cfg.weight)
    return Setting(method, weight, particles, run, backend, dict(extra))


def dlm_setting(method: str, draft, k: int, n_new: int, eos: int, T: float, top_p: float) -> Setting:
    run = lambda p, s: dlm_generate(draft, p, max_new_tokens=n_new, tokens_per_step=k, temperature=T,  # noqa: E731
                                    top_p=top_p, seed=s, eos_token_id=eos)
    return Setting(method, None, None, run, extra={"tokens_per_step": k})


def ar_setting(target, n_new: int, eos: int, T: float, top_p: float) -> Setting:
    run = lambda p, s: ar_generate(target, p, max_new_tokens=n_new, temperature=T, top_p=top_p,  # noqa: E731
                                   seed=s, eos_token_id=eos)
    return Setting("ar", None, None, run)


def sweep_method(weight: float, particles: int) -> str:
    if weight == 1.0:
        return "is-only"
    if weight == 0.0 and particles == 1:
        return "speculative"
    return "poe-bridge"


# ---------------------------------------------------------------------------------------------
# Metrics, intervals, claims
# ---------------------------------------------------------------------------------------------

def fused_label() -> str:
    """The backend the automatic choice takes for CPU float32 logits: ``cpu`` when the C++
    extension is built, else the reference."""
    import diffkern
    return "cpu" if diffkern.backends()["cpu"] else "auto(reference)"


def wilson(successes: float, n: float, z: float = 1.959964) -> List[float]:
    """Wilson score 95 % interval of a binomial proportion."""
    if n <= 0:
        return [0.0, 1.0]
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, centre - half), min(1.0, centre + half)]


def metric(m: Measured, name: str, idx: Optional[np.ndarray] = None):
    """Pooled ``name`` of ``m`` (scalar), or one value per bootstrap resample when ``idx`` [R, N]
    holds resampled problem indices; None where undefined (e.g. acceptance of AR decoding)."""
    num_f, den_f = METRICS[name]
    tot = m.totals()
    if idx is None:
        num = tot[num_f].sum()
        den = tot[den_f].sum() if den_f else len(tot[num_f]) * m.num_seeds
    else:
        num = tot[num_f][idx].sum(axis=1)
        den = tot[den_f][idx].sum(axis=1) if den_f else np.full(len(idx), idx.shape[1] * m.num_seeds, float)
    if np.all(np.asarray(den) == 0):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return num / den


def seconds_per_problem(m: Measured) -> float:
    n = len(next(iter(m.per_seed.values()))["correct"])
    return float(np.median([m.seconds[s] for s in m.per_seed])) / n


def row(task: str, m: Measured, seed: Optional[int] = None) -> dict:
    """One JSON row: pooled over seeds when ``seed`` is None, else for that seed."""
    view = m if seed is None else Measured(m.setting, {seed: m.per_seed[seed]}, {seed: m.seconds[seed]})
    st = m.setting
    n = len(next(iter(view.per_seed.values()))["correct"]) * view.num_seeds
    acc = metric(view, "accuracy")
    out = {"task": task, "method": st.method, "label": st.label, "weight": st.weight, "particles": st.particles,
           "seed": seed if seed is not None else "pooled", "accuracy": float(acc),
           "accuracy_ci": wilson(acc * n, n)}
    for name in ("dlm_forwards", "ar_forwards", "tokens_per_dlm_forward", "acceptance", "ess_over_k", "ar_nll"):
        v = metric(view, name)
        out[name] = None if v is None else float(v)
    out["seconds_per_problem"] = seconds_per_problem(view)
    out["backend"] = fused_label() if st.backend == "auto" else st.backend
    out.update(st.extra)
    return out


@dataclass
class Claim:
    name: str
    holds: bool
    value: object
    interval: object
    statement: str

    def as_dict(self) -> dict:
        return {"name": self.name, "holds": bool(self.holds), "value": self.value, "interval": self.interval,
                "statement": self.statement}


class Bootstrap:
    """Paired percentile bootstrap over problems (``resamples`` draws, fixed seed)."""

    def __init__(self, num_problems: int, resamples: int = 2000, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.idx = rng.integers(0, num_problems, size=(resamples, num_problems))

    def interval(self, fn: Callable[[Optional[np.ndarray]], object]) -> List[float]:
        draws = np.asarray(fn(self.idx), dtype=float)
        draws = draws[np.isfinite(draws)]
        if draws.size == 0:
            return [float("nan"), float("nan")]
        return [float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))]

    def claim(self, name: str, fn, test: Callable[[float, List[float]], bool], statement: str) -> Claim:
        value = fn(None)
        if value is None:
            return Claim(name, False, None, None, statement + " (undefined)")
        ci = self.interval(fn)
        return Claim(name, bool(test(float(value), ci)), float(value), ci, statement)


def claims(results: Dict[str, Measured], default_weight: float, boot: Bootstrap) -> List[Claim]:
    """The issue's claims at the default (w, K = 4), plus the calibration gate."""
    def key(method, w=None, k=None):
        return Setting(method, w, k, None).label

    def get(label):
        if label not in results:
            raise KeyError(f"claims need the setting {label!r}; it was not run")
        return results[label]

    w0 = default_weight
    poe4, poe8 = get(key("poe-bridge", w0, 4)), get(key("poe-bridge", w0, 8))
    ar, dlm1, spec = get("ar"), get("dlm-1"), get("speculative")
    matched = next(m for m in results.values() if m.setting.method == "dlm-matched")
    is4, is8 = get(key("is-only", 1.0, 4)), get(key("is-only", 1.0, 8))

    def ratio(a, ma, b, mb):
        return lambda idx: metric(a, ma, idx) / metric(b, mb, idx)

    def diff(a, ma, b, mb):
        return lambda idx: metric(a, ma, idx) - metric(b, mb, idx)

    c = [
        boot.claim("calibration_ar_accuracy_in_gate", lambda idx: metric(ar, "accuracy", idx),
                   lambda v, ci: 0.80 <= v <= 0.95, "AR accuracy in [0.80, 0.95]"),
        boot.claim("calibration_dlm1_below_ar", diff(ar, "accuracy", dlm1, "accuracy"),
                   lambda v, ci: v >= 0.05, "acc(AR) - acc(dlm-1) >= 0.05"),
        boot.claim("calibration_speculative_tokens_per_dlm_forward",
                   lambda idx: metric(spec, "tokens_per_dlm_forward", idx), lambda v, ci: v >= 3.0,
                   "speculative decoding: >= 3 tokens per DLM forward"),
        boot.claim("accuracy_ratio_vs_ar", ratio(poe4, "accuracy", ar, "accuracy"),
                   lambda v, ci: v >= 0.95 and ci[0] >= 0.90,
                   "acc(PoE)/acc(AR) >= 0.95 with bootstrap lower bound >= 0.90"),
        boot.claim("dlm_forward_reduction_vs_dlm1", ratio(dlm1, "dlm_forwards", poe4, "dlm_forwards"),
                   lambda v, ci: v >= 3.0, "DLM fwd(dlm-1) / DLM fwd(PoE) >= 3 (paper: 5)"),
        boot.claim("ar_forward_ratio_vs_ar", ratio(poe4, "ar_forwards", ar, "ar_forwards"),
                   lambda v, ci: v <= 0.6, "AR fwd(PoE) / AR fwd(AR) <= 0.6"),
        boot.claim("accuracy_gain_vs_dlm_matched", diff(poe4, "accuracy", matched, "accuracy"),
                   lambda v, ci: v >= 0.20, f"acc(PoE) - acc({matched.setting.label}) >= 0.20"),
        boot.claim("accuracy_gain_vs_dlm1", diff(poe4, "accuracy", dlm1, "accuracy"),
                   lambda v, ci: v >= 0.0, "acc(PoE) >= acc(dlm-1)"),
        boot.claim("accuracy_gain_vs_is_only_k4", diff(poe4, "accuracy", is4, "accuracy"),
                   lambda v, ci: v >= 0.20, "K=4: acc(PoE) - acc(IS-only) >= 0.20"),
        boot.claim("accuracy_gain_vs_is_only_k8", diff(poe8, "accuracy", is8, "accuracy"),
                   lambda v, ci: v >= 0.20, "K=8: acc(PoE) - acc(IS-only) >= 0.20"),
        boot.claim("ess_over_k_ratio_vs_is_only_k4", ratio(poe4, "ess_over_k", is4, "ess_over_k"),
                   lambda v, ci: v > 1.0, "K=4: ESS/K(PoE) > ESS/K(IS-only)"),
        boot.claim("ess_over_k_ratio_vs_is_only_k8", ratio(poe8, "ess_over_k", is8, "ess_over_k"),
                   lambda v, ci: v > 1.0, "K=8: ESS/K(PoE) > ESS/K(IS-only)"),
        boot.claim("acceptance_gain_vs_speculative", diff(poe4, "acceptance", spec, "acceptance"),
                   lambda v, ci: v >= 0.10, "accept(PoE) - accept(speculative) >= 0.10"),
        boot.claim("dlm_forward_ratio_vs_speculative", ratio(poe4, "dlm_forwards", spec, "dlm_forwards"),
                   lambda v, ci: v <= 0.8, "DLM fwd(PoE) / DLM fwd(speculative) <= 0.8"),
        boot.claim("accuracy_change_vs_speculative", diff(poe4, "accuracy", spec, "accuracy"),
                   lambda v, ci: v >= -0.05, "acc(PoE) >= acc(speculative) - 0.05"),
        boot.claim("speculative_matches_ar", diff(spec, "accuracy", ar, "accuracy"),
                   lambda v, ci: ci[0] <= 0.0 <= ci[1], "acc(speculative) - acc(AR): interval contains 0"),
    ]
    sweep = [get(key(sweep_method(w, 4), w, 4)) for w in WEIGHTS]
    c.append(_monotone(boot, sweep, "acceptance", increasing=True))
    c.append(_monotone(boot, sweep, "ess_over_k", increasing=False))
    return c


def _monotone(boot: Bootstrap, sweep: List[Measured], name: str, increasing: bool) -> Claim:
    """Monotone in w within the bootstrap: no consecutive difference significantly of the wrong sign."""
    values = [float(metric(m, name)) for m in sweep]
    intervals = [boot.interval(lambda idx, a=a, b=b: metric(b, name, idx) - metric(a, name, idx))
                 for a, b in zip(sweep, sweep[1:])]
    holds = all((hi >= 0) if increasing else (lo <= 0) for lo, hi in intervals)
    word = "non-decreasing" if increasing else "non-increasing"
    return Claim(f"{name}_{word.replace('-', '_')}_in_w", holds, values, intervals,
                 f"K=4: {name} {word} over w={list(WEIGHTS)} (value: per w; interval: consecutive differences)")
