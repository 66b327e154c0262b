"""Bench cases of the TabDiff family (``diffkern bench --suite tabdiff``), at UCI Adult's columns:
n = 6 numerical, K = [9, 16, 7, 15, 6, 5, 2, 42, 2] categorical (L = sum(K_j + 1) = 113 logit slots).

**One step outside the network** (op ``tabdiff churn+step``, B = 10,000 rows; ``--quick``: 500):
the churn before the network (numerical noise, re-masking) and the step after it (EDM Euler
update, categorical unmask sampler over each column's logit segment), in two states: every
categorical cell masked (the first steps) and about half masked (mid-sampling). The network's
outputs (``denoised``, raw ``logits``) are fixed inputs. Rows:

* ``eager``: a plain-torch step written the way the official code (MinkaiXu/TabDiff,
  ``UnifiedCtimeDiffusion.edm_update``, ``_subs_parameterization``, ``pad``, ``_mdlm_update``,
  ``_sample_categorical``) writes it: ``torch.randn`` churn, ``torch.rand`` re-mask, the logit
  segments split, padded with -1e6 (the official ``neg_infinity``) to ``[B, m, K_max + 1]``
  (list comprehension + ``torch.stack``), MASK logit pushed to -1e6, log-softmax, SUBS writes
  for unmasked cells, weights ``q`` with the MASK slot set and the padding zeroed by a mask
  built from Python lists, one ``torch.rand`` per padded slot for the exponential race, argmax,
  copy-flag merge. Everything in float32 as the official (its tables and logits are float32, so
  ``rand_like(q)`` is float32). Left out, to keep the row a lower bound on the official's cost:
  the one-hot encodings of ``x_cat_hat`` that the official builds for the network's input (our
  network gathers embeddings instead, inside its own time) and the diagnostics of its error path.
* ``torch.compile(eager)``: the same function under ``torch.compile`` (not timed with ``--quick``).
* ``reference`` and every compiled backend of the op on the device (``cpu``; ``triton`` with
  ``--device cuda``): ``diffkern.ops.tabdiff_churn`` + ``diffkern.ops.tabdiff_step`` drawing
  their random numbers from the Philox stream (no explicit uniforms: drawing only the numbers a
  cell uses, inside the kernel, is part of what is timed).

Speed-ups are over ``eager`` ("x ref") and ``torch.compile(eager)`` ("x compile"). The error
column compares the numerical output ``x_num_next`` with the ``reference`` row (same Philox
stream: the same noise, the same categories); the eager rows draw from torch's generator, so
their outputs cannot be compared value by value and their error is marked n/a (the tests check
that eager's Euler output equals the reference's given the same noise and that its categories
are valid). ``elements`` = B x (n + L): the numerical cells plus the logit slots of a step;
``bytes_moved`` = what the fused churn + step must read and write at least (float32 state, int64
categories, every logit read once): 884 bytes a row, so at B = 10,000 the working set (8.8 MB)
may sit in the last-level cache and the "% stream" column can pass 100 %.

The per-column tables are a representative step's (sigma_hat = 1.02 sigma, the churn of 50
steps; masking levels matching the state); their values do not change the work, the masked
fraction does.

**A whole sample()** (op ``tabdiff sample()``): ``load_shipped("adult").sample(32,561 rows)``
(Adult's training size) at the model's default steps (50) and batch size (10,000);
``--quick``: 500 rows, 5 steps. One run per backend (``reference``, and the fused backends of
the device), each in a fresh Python process, after a tiny warm-up sample there: its wall
time is the row's time (one repeat; ``min_ms = max_ms``), split by timing wrappers installed
for the run around ``diffkern.ops.tabdiff_*`` ("step ops": churn, step, heun, observe, guide)
and around the sampler's denoiser call (``sampler._Network.__call__``, "network"); the rest
(prior noise, sampler tables, batching, decoding the table) is wall minus both. The wrappers
time exclusively (nested calls are not counted twice) and check that they saw every call the
sampler makes (2T - 1 network calls and T churn/step calls a batch), so a changed sampler
cannot silently zero a share. Peak memory is the child's peak RSS (``getrusage(RUSAGE_SELF)``,
Linux: KiB), reported with its growth over the RSS just before the timed sample (torch, pandas
and the model are loaded by then). The row's note carries the shares; ``--json`` keeps them in
the row's ``details``; the table printer adds a small split table. The error column compares the
sampled ``x_num`` (model space, before decoding) with the reference backend's. ``elements`` =
rows sampled, so "elem/s" is rows/s; no bytes are counted (GB/s and % stream stay empty).
With ``--device cuda`` these rows are reported as skipped: the sampler keeps its state on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Callable, Iterator, Optional, Sequence

import torch

import diffkern
from diffkern.bench.devices import Timing
from diffkern.bench.harness import (Case, CasePlan, Measured, compile_lazily, fast_backends, unavailable)

ADULT_N = 6
ADULT_K = (9, 16, 7, 15, 6, 5, 2, 42, 2)
ADULT_ROWS = 32_561                       # Adult's training split: what `diffkern demo tabdiff` samples
STEP_OP, SAMPLE_OP = "tabdiff churn+step", "tabdiff sample()"
NEG_INF = -1_000_000.0                    # the official sampler's stand-in for -inf
RACE_EPS = 1e-10
STEP_OPS = ("tabdiff_churn", "tabdiff_step", "tabdiff_heun", "tabdiff_observe", "tabdiff_guide")
EAGER = ("eager", "torch.compile(eager)", "reference")


# ---- the official-style eager step ----------------------------------------------------------

class OfficialStyleStep:
    """One sampler step outside the network as the official ``edm_update`` computes it, plain torch.

    Holds what the official module precomputes once (MASK indices, segment widths); ``__call__``
    is one step: churn, Euler, SUBS, unmask. ``noise``/``generator`` exist for the tests (the
    same noise as the reference; reproducible draws); the bench passes neither.
    """

    def __init__(self, num_classes: Sequence[int], device="cpu"):
        self.num_classes = [int(k) for k in num_classes]
        self.widths = [k + 1 for k in self.num_classes]
        self.mask_index = torch.tensor(self.num_classes, dtype=torch.int64, device=device)

    def churn(self, x_num, x_cat, sigma_cur, sigma_hat, sc_cur, sc_hat, noise=None, generator=None):
        if noise is None:
            noise = torch.randn(x_num.shape, generator=generator, dtype=x_num.dtype, device=x_num.device)
        x_num_hat = x_num + (sigma_hat ** 2 - sigma_cur ** 2).sqrt() * noise
        move_chance = -torch.expm1(sc_cur - sc_hat)
        move = torch.rand(x_cat.shape, generator=generator, device=x_cat.device) < move_chance
        return x_num_hat, torch.where(move, self.mask_index, x_cat)

    def pad(self, raw_logits):
        """``[B, L]`` -> ``[B, m, K_max + 1]``, each segment padded with NEG_INF (list + stack)."""
        width = max(self.widths)
        segments = torch.split(raw_logits, self.widths, dim=-1)
        return torch.stack([torch.cat((s, torch.full((s.shape[0], width - s.shape[1]), NEG_INF, dtype=s.dtype,
                                                     device=s.device)), dim=-1) for s in segments], dim=-2)

    def subs(self, raw_logits, x_cat_hat):
        """SUBS: MASK logit out, log-softmax; an unmasked cell's distribution is its own value."""
        padded = self.pad(raw_logits)
        padded[:, range(len(self.widths)), self.mask_index] += NEG_INF
        log_p = padded - torch.logsumexp(padded, dim=-1, keepdim=True)
        unmasked = x_cat_hat != self.mask_index
        log_p[unmasked] = NEG_INF
        log_p[unmasked, x_cat_hat[unmasked]] = 0.0
        return log_p

    def unmask(self, log_p, x_cat_hat, alpha_t, alpha_s, generator=None):
        move_t, move_s = (1 - alpha_t).unsqueeze(-1), (1 - alpha_s).unsqueeze(-1)
        q = log_p.exp() * (move_t - move_s)
        q[:, range(q.shape[1]), self.mask_index] = move_s[:, :, 0]
        width = max(self.widths)
        real_slots = torch.tensor([[1.0 if slot <= k else 0.0 for slot in range(width)] for k in self.num_classes],
                                  device=q.device)
        q = q * (torch.ones_like(q) * real_slots)                    # padding can never be drawn
        u = torch.rand(q.shape, generator=generator, dtype=q.dtype, device=q.device)
        draw = (q / (RACE_EPS - (u + RACE_EPS).log())).argmax(dim=-1)
        copy = (x_cat_hat != self.mask_index).to(x_cat_hat.dtype)
        return copy * x_cat_hat + (1 - copy) * draw

    def __call__(self, x_num, x_cat, denoised, raw_logits, sigma_cur, sigma_hat, sigma_next, sc_cur, sc_hat,
                 sc_next, noise=None, generator=None):
        B = x_num.shape[0]
        x_num_hat, x_cat_hat = self.churn(x_num, x_cat, sigma_cur, sigma_hat, sc_cur, sc_hat, noise, generator)
        d = (x_num_hat - denoised) / sigma_hat
        x_num_next = x_num_hat + (sigma_next - sigma_hat) * d
        log_p = self.subs(raw_logits, x_cat_hat)
        alpha_t = torch.exp(-sc_hat).unsqueeze(0).repeat(B, 1)
        alpha_s = torch.exp(-sc_next).unsqueeze(0).repeat(B, 1)
        return x_num_next, self.unmask(log_p, x_cat_hat, alpha_t, alpha_s, generator), d


# ---- the per-step case ----------------------------------------------------------------------

STATES = {"all masked": 1.0, "half masked": 0.5}


def step_tables(state: str, n: int = ADULT_N, m: int = len(ADULT_K)) -> dict:
    """Per-column float32 tables of a representative step in ``state`` (the official's names):
    sigma levels (numerical), sigma_cat levels (categorical; alpha = exp(-sigma_cat))."""
    sigma_cur = torch.linspace(20.0, 40.0, n) if state == "all masked" else torch.linspace(0.5, 1.5, n)
    alpha_cur = 0.001 if state == "all masked" else 0.5                 # the unmasked fraction now
    sc_cur = torch.full((m,), -math.log(alpha_cur))
    return {"sigma_cur": sigma_cur, "sigma_hat": sigma_cur * 1.02, "sigma_next": sigma_cur * 0.8,
            "sc_cur": sc_cur, "sc_hat": sc_cur * 1.02, "sc_next": sc_cur * 0.9}


def fused_tables(tables: dict) -> dict:
    """The operators' per-column inputs (float64, as ``sampler_tables`` makes them) from the same levels."""
    t = {k: v.double() for k, v in tables.items()}
    return {"sigma_cur": t["sigma_cur"], "sigma_hat": t["sigma_hat"], "sigma_next": t["sigma_next"],
            "remask": -torch.expm1(t["sc_cur"] - t["sc_hat"]), "alpha_t": torch.exp(-t["sc_hat"]),
            "alpha_s": torch.exp(-t["sc_next"])}


def step_inputs(B: int, state: str, num_classes: Sequence[int] = ADULT_K, n: int = ADULT_N, seed: int = 0):
    """``(x_num, x_cat, denoised, logits)``: float32 state, int64 categories with the state's masked
    fraction, network outputs (raw logits, MASK slot included)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.tensor(list(num_classes))
    x_num = torch.randn(B, n, generator=g) * 3
    x_cat = (torch.rand(B, len(num_classes), generator=g) * K).long()
    masked = torch.rand(B, len(num_classes), generator=g) < STATES[state]
    x_cat = torch.where(masked, K.expand(B, -1), x_cat)
    denoised = x_num * 0.5 + torch.randn(B, n, generator=g) * 0.1
    logits = torch.randn(B, sum(num_classes) + len(num_classes), generator=g) * 2
    return x_num, x_cat, denoised, logits


def fused_step(x_num, x_cat, denoised, logits, tables: dict, num_classes, step: int = 10, seed: int = 0):
    """churn + step through ``diffkern.ops`` with the seed stream (the backend is the caller's)."""
    t = tables
    x_hat, c_hat = diffkern.ops.tabdiff_churn(x_num, x_cat, t["sigma_cur"], t["sigma_hat"], t["remask"], num_classes,
                                              seed=seed, step=step)
    return diffkern.ops.tabdiff_step(x_hat, c_hat, denoised, logits, t["sigma_hat"], t["sigma_next"], num_classes,
                                     t["alpha_t"], t["alpha_s"], seed=seed, step=step)


def _on(backend: str, fn: Callable) -> Callable:
    def run():
        with diffkern.use_backend(backend):
            return fn()
    return run


def _fast(device: str) -> list[str]:
    """The compiled backends that run both operators of the step on ``device``."""
    churn = set(fast_backends("tabdiff_churn", device))
    return [b for b in fast_backends("tabdiff_step", device) if b in churn]


def _step_case(B: int, state: str, device: str, label: str) -> Case:
    x_num, x_cat, denoised, logits = (t.to(device) for t in step_inputs(B, state))
    levels = {k: v.to(device) for k, v in step_tables(state).items()}
    tables = {k: v.to(device) for k, v in fused_tables(step_tables(state)).items()}
    eager = OfficialStyleStep(ADULT_K, device)
    compiled = compile_lazily(eager.__call__)
    args = (x_num, x_cat, denoised, logits, levels["sigma_cur"], levels["sigma_hat"], levels["sigma_next"],
            levels["sc_cur"], levels["sc_hat"], levels["sc_next"])
    fused = functools.partial(fused_step, x_num, x_cat, denoised, logits, tables, list(ADULT_K))
    fast = _fast(device)
    impls = {"eager": lambda: eager(*args), "torch.compile(eager)": lambda: compiled(*args),
             "reference": _on("reference", fused), **{b: _on(b, fused) for b in fast}}
    L = logits.shape[1]
    n, m = x_num.shape[1], x_cat.shape[1]
    not_comparable = "torch's RNG, not the Philox stream"
    return Case(op=STEP_OP, label=label, impls=impls, skipped=unavailable(fast),
                baseline="eager", compiled="torch.compile(eager)", error_baseline="reference",
                no_error={"eager": not_comparable, "torch.compile(eager)": not_comparable},
                bytes_moved=B * (24 * n + 32 * m + 4 * L), elements=B * (n + L))


# ---- the whole sample() ---------------------------------------------------------------------

class TimeSplit:
    """Exclusive wall time per category of wrapped calls (a call inside another wrapped call
    pauses the outer one's clock). ``sync`` runs at every boundary (``torch.cuda.synchronize``
    for asynchronous work)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None):
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self._stack: list[list] = []        # [category, start of its running interval]
        self._sync = sync

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def wrap(self, category: str, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            now = self._now()
            if self._stack:
                outer = self._stack[-1]
                self.seconds[outer[0]] += now - outer[1]
            self._stack.append([category, now])
            self.calls[name] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                now = self._now()
                inner = self._stack.pop()
                self.seconds[inner[0]] += now - inner[1]
                if self._stack:
                    self._stack[-1][1] = now
        return timed


@contextlib.contextmanager
def sampler_split(split: TimeSplit) -> Iterator[TimeSplit]:
    """Wrap the sampler's operator and denoiser calls for the duration of the context (restored after)."""
    from diffkern import ops
    from diffkern.tabdiff import sampler

    saved = [(ops, name, getattr(ops, name)) for name in STEP_OPS]
    saved.append((sampler._Network, "__call__", sampler._Network.__call__))
    try:
        for owner, name, fn in saved:
            category = "network" if name == "__call__" else "step ops"
            setattr(owner, name, split.wrap(category, "network" if name == "__call__" else name, fn))
        yield split
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def split_shares(wall_s: float, seconds: dict) -> dict:
    """``{"network", "step ops", "rest"}`` seconds and percentages of ``wall_s`` (rest = the remainder)."""
    network, ops_s = seconds.get("network", 0.0), seconds.get("step ops", 0.0)
    parts = {"network": network, "step ops": ops_s, "rest": wall_s - network - ops_s}
    return {"seconds": parts, "percent": {k: 100.0 * v / wall_s for k, v in parts.items()}}


def expected_calls(rows: int, steps: int, batch_size: int, heun: bool = True) -> dict:
    batches = math.ceil(rows / batch_size)
    return {"network": batches * (2 * steps - 1 if heun else steps), "tabdiff_churn": batches * steps,
            "tabdiff_step": batches * steps, "tabdiff_heun": batches * (steps - 1 if heun else 0)}


def _rss_mb() -> float:
    """This process's resident set now (Linux /proc; elsewhere NaN)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def measure_sample(backend: str, rows: int, steps: Optional[int] = None, threads: Optional[int] = None,
                   seed: int = 0) -> dict:
    """One timed ``sample(rows)`` of the shipped Adult model on ``backend`` in this process, split
    into network / step ops / rest. Run it in a fresh process for a meaningful peak RSS."""
    from diffkern.tabdiff import load_shipped
    from diffkern.tabdiff import synthesizer

    if threads:
        torch.set_num_threads(threads)
    synth = load_shipped("adult")
    cfg = synth.config
    steps = steps or cfg.steps
    captured = {}
    sample_rows = synthesizer.sample_rows

    def capture(*args, **kwargs):                  # the sampled tensors before decoding
        captured["x_num"], captured["x_cat"] = sample_rows(*args, **kwargs)
        return captured["x_num"], captured["x_cat"]

    with diffkern.use_backend(backend):
        synth.sample(min(rows, 8), seed=seed + 1, steps=2, progress=False)     # warm-up, not timed
        rss_before = _rss_mb()
        split = TimeSplit()
        synthesizer.sample_rows = capture
        try:
            with sampler_split(split):
                start = time.perf_counter()
                synth.sample(rows, seed=seed, steps=steps, progress=False)
                wall = time.perf_counter() - start
        finally:
            synthesizer.sample_rows = sample_rows
    expect = expected_calls(rows, steps, cfg.sample_batch_size, cfg.heun and synth.model.n_num > 0)
    missed = {k: (split.calls[k], v) for k, v in expect.items() if split.calls[k] != v}
    if missed:
        raise RuntimeError(f"the time split saw other call counts than the sampler makes (seen, expected): {missed}; "
                           "the sampler changed how it calls the network or the operators")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024       # Linux: KiB
    return {"backend": backend, "rows": rows, "steps": steps, "batch_size": cfg.sample_batch_size,
            "threads": torch.get_num_threads(), "wall_s": wall, **split_shares(wall, split.seconds),
            "calls": dict(split.calls), "peak_rss_mb": peak, "rss_before_mb": rss_before,
            "rss_growth_mb": peak - rss_before, "x_num": captured["x_num"]}


def _in_fresh_process(backend: str, rows: int, steps: Optional[int]) -> dict:
    """:func:`measure_sample` in a new Python process (this interpreter, this environment)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sample.pt")
        code = ("import sys, torch; from diffkern.bench.tabdiff import measure_sample; "
                "a = sys.argv[1:]; torch.save(measure_sample(a[0], int(a[1]), int(a[2]) or None, int(a[3])), a[4])")
        args = [backend, str(rows), str(steps or 0), str(torch.get_num_threads()), path]
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            raise RuntimeError(f"the sampling process failed: {last}")
        return torch.load(path)


def sample_note(result: dict) -> str:
    p = result["percent"]
    return (f"network {p['network']:.1f}% | step ops {p['step ops']:.1f}% | rest {p['rest']:.1f}% | "
            f"peak RSS {result['peak_rss_mb']:.0f} MB")


def _measured_sample(backend: str, rows: int, steps: Optional[int]) -> Measured:
    result = _in_fresh_process(backend, rows, steps)
    x_num = result.pop("x_num")
    wall = result["wall_s"]
    return Measured(Timing(wall, wall, wall, 1), output=x_num, note=sample_note(result), details={"sample": result})


def _missing_extra() -> Optional[str]:
    from diffkern._optional import MissingDependency, require

    try:
        require("pandas", "the whole-sample rows")
        require("safetensors", "the whole-sample rows")
    except MissingDependency as exc:
        return str(exc)
    return None


def _sample_case(rows: int, steps: Optional[int], device: str, label: str, impls: Sequence[str]) -> Case:
    calls = {name: functools.partial(_measured_sample, name, rows, steps) for name in impls}
    skipped = unavailable([b for b in impls if b != "reference"])
    if device != "cpu":
        why = "the TabDiff sampler keeps its state on the CPU (no device argument); --device cpu times it"
        skipped = {name: why for name in impls}
    elif (missing := _missing_extra()) is not None:
        skipped = {name: missing for name in impls}
    return Case(op=SAMPLE_OP, label=label, impls=calls, skipped=skipped, baseline="reference", compiled=None,
                bytes_moved=0, elements=rows, self_timed=True)


# ---- the plan -------------------------------------------------------------------------------

def plan(quick: bool, device: str = "cpu") -> Iterator[CasePlan]:
    B = 500 if quick else 10_000
    fast = _fast(device)
    for state in STATES:
        label = f"B={B} n={ADULT_N} m={len(ADULT_K)} L={sum(ADULT_K) + len(ADULT_K)}, {state}"
        yield CasePlan(STEP_OP, label, (*EAGER, *fast), functools.partial(_step_case, B, state, device, label))
    rows, steps = (500, 5) if quick else (ADULT_ROWS, None)
    label = f"shipped Adult model, {rows} rows, " + (f"{steps} steps" if steps else "its default steps")
    impls = ("reference", *fast)
    yield CasePlan(SAMPLE_OP, label, impls, functools.partial(_sample_case, rows, steps, device, label, impls))
