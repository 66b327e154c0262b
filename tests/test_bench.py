"""`diffkern bench` machinery: the synchronised timer (a fake asynchronous device), the device
axis, the suite registry, the progress total, --compare (a planted 2x slowdown) and the plot.
No timing is asserted about real work: the fake device's times are exact by construction."""

import functools
import json

import pytest
import torch

import diffkern
from diffkern import cli
from diffkern.bench import SUITES, compare, devices, harness, plot, suite_plan

# ---- a fake asynchronous device -------------------------------------------------------------


class FakeDevice:
    """Work is queued with a duration and returns at once, like a kernel launch; events stamp
    the queue's timeline and may be read only after a synchronize."""

    def __init__(self):
        self.timeline_ms, self.synced, self.flushes = 0.0, True, 0

    def launch(self, ms: float):
        self.timeline_ms += ms
        self.synced = False
        return torch.zeros(3)

    def synchronize(self):
        self.synced = True

    def flush(self):
        self.flushes += 1

    def new_event(self):
        return FakeEvent(self)

    def clock(self) -> devices.EventClock:
        return devices.EventClock(self.new_event, self.synchronize, flush=self.flush)


class FakeEvent:
    def __init__(self, device: FakeDevice):
        self.device = device

    def record(self):
        self.at = self.device.timeline_ms

    def synchronize(self):
        self.device.synchronize()

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.device.synced, "events read before the device was synchronised"
        return end.at - self.at


def test_event_clock_times_the_device_work_not_the_launch():
    dev = FakeDevice()
    work = functools.partial(dev.launch, 5.0)
    assert devices.EventClock(dev.new_event, dev.synchronize).seconds(work) == pytest.approx(5e-3)
    assert devices.WallClock().seconds(work) < 1e-3           # the host clock sees only the launch
    timing, out = devices.time_call(work, dev.clock(), min_repeats=4, max_repeats=4)
    assert (timing.median_s, timing.min_s, timing.max_s, timing.repeats) == pytest.approx((5e-3, 5e-3, 5e-3, 4))
    assert dev.flushes == 4 and torch.equal(out, torch.zeros(3))


def test_time_call_records_the_repeat_spread():
    class Scripted:                                           # a clock that returns given seconds
        max_repeats = 5
        times = iter([0.003, 0.001, 0.002, 0.005, 0.004])

        def synchronize(self):
            pass

        def seconds(self, fn):
            fn()
            return next(self.times)

    timing, _ = devices.time_call(lambda: None, Scripted(), min_repeats=5)
    assert (timing.median_s, timing.min_s, timing.max_s, timing.repeats) == (0.003, 0.001, 0.005, 5)


# ---- a fake suite (registered as "fake" by the tests that run it) ----------------------------

LAUNCH_MS = {"reference": 4.0, "torch.compile(reference)": 3.0, "cpu": 1.0, "torch.exp": 0.5}


def _fake_case(op: str, n: int, launch, label: str) -> harness.Case:
    x = torch.ones(n)
    impls = {name: functools.partial(launch, ms) if launch else (lambda: x * 2)
             for name, ms in LAUNCH_MS.items() if name != "torch.exp"}
    return harness.Case(op=op, label=label, impls=impls, bytes_moved=8 * n, elements=n,
                        extra={"torch.exp": functools.partial(launch, 0.5) if launch else (lambda: x.exp())},
                        skipped={"cpu": "not built here (a test)"} if op == "fake_b" else {})


def plan(quick, device="cpu", launch=None):
    for op in ("fake_a", "fake_b"):
        for n in (1000, 2000):
            yield harness.CasePlan(op, f"n={n}", (*[k for k in LAUNCH_MS if k != "torch.exp"], "torch.exp"),
                                   functools.partial(_fake_case, op, n, launch, f"n={n}"))


def _fake_gpu_report(**kwargs) -> dict:
    dev = FakeDevice()
    gpu = devices.BenchDevice("fakegpu", "Fake GPU", dev.clock(), lambda quick: (100.0, "fake copy"), "fake copy")
    return harness.run(list(plan(True, launch=lambda ms: dev.launch(ms))), quick=False, device=gpu, **kwargs)


def test_the_harness_times_a_device_through_its_clock_and_limit():
    report = _fake_gpu_report(progress=False)
    assert report["machine"]["device"] == "fakegpu" and report["machine"]["limit_gbps"] == 100.0
    rows = {(r["op"], r["label"], r["impl"]): r for r in report["rows"]}
    assert len(rows) == 16
    fast = rows[("fake_a", "n=1000", "cpu")]
    assert fast["median_ms"] == pytest.approx(1.0) and fast["min_ms"] == fast["max_ms"] == pytest.approx(1.0)
    assert fast["speedup_vs_baseline"] == pytest.approx(4.0) and fast["speedup_vs_compiled"] == pytest.approx(3.0)
    assert fast["frac_stream_bw"] == pytest.approx(8000 / 1e-3 / 1e9 / 100.0)   # GB/s over the fake limit
    assert fast["device"] == "fakegpu" and fast["baseline"] == "reference" and fast["repeats"] == 100
    assert rows[("fake_b", "n=1000", "cpu")]["note"] == "skipped: not built here (a test)"
    assert rows[("fake_a", "n=1000", "torch.exp")]["speedup_vs_baseline"] is None


def test_progress_counts_the_work_up_front(capsys):
    _fake_gpu_report(progress=True)
    err = capsys.readouterr().err
    assert "0/16" in err and "case 1/4" in err and "fake_a n=1000 | reference" in err


def test_a_time_budget_reports_unstarted_cases_as_skipped():
    rows = _fake_gpu_report(progress=False, budget_s=0.0)["rows"]
    assert len(rows) == 16 and all(r["note"].startswith("skipped: time budget") for r in rows)


def test_the_cuda_axis_plans_the_gpu_backends():
    """What `--device cuda` would time, planned here (no tensor is made while planning)."""
    cuda_rows = {(p.op, impl) for s in SUITES for p in suite_plan(s, False, "cuda") for impl in p.impls}
    assert ("chebyshev_forecast", "cuda") in cuda_rows and ("poe_verify", "triton") in cuda_rows
    assert ("poe_draft", "torch.compile(eager)") in cuda_rows
    assert not any(impl == "cpu" for _, impl in cuda_rows)
    cpu_rows = {(p.op, impl) for s in SUITES for p in suite_plan(s, True, "cpu") for impl in p.impls}
    assert ("chebyshev_eval", "cpu") in cpu_rows and not any(i in ("cuda", "triton") for _, i in cpu_rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_clear_line(capsys):
    assert cli.main(["bench", "--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkern bench: --device cuda:")


def test_suites_are_a_registration(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):                       # not a choice before it is registered
        cli.build_parser().parse_args(["bench", "--suite", "fake"])
    capsys.readouterr()
    monkeypatch.setitem(SUITES, "fake", __name__)
    assert cli.build_parser().parse_args(["bench", "--suite", "fake"]).suite == ["fake"]
    out = tmp_path / "fake.json"
    assert cli.main(["bench", "--suite", "fake", "--quick", "--no-progress", "--json", str(out), "--png", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == {"fake_a", "fake_b"} and all(r["device"] == "cpu" for r in rows)
    assert all(r["repeats"] >= 3 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
               for r in rows if not r["note"])
    assert "skipped: not built here (a test)" in capsys.readouterr().out


# ---- --compare --------------------------------------------------------------------------------

def _write(path, report):
    path.write_text(json.dumps(report))
    return str(path)


def _slowed(report: dict, op: str, impl: str, factor: float) -> dict:
    doctored = json.loads(json.dumps(report))
    for r in doctored["rows"]:
        if r["op"] == op and r["impl"] == impl:
            for field in ("median_ms", "min_ms", "max_ms"):
                r[field] *= factor
    return doctored


def test_compare_flags_a_planted_2x_slowdown(tmp_path, capsys):
    base = _fake_gpu_report(progress=False)
    base_path = _write(tmp_path / "base.json", base)
    assert cli.main(["bench", "--compare", base_path, base_path, "--fail-ratio", "1.5"]) == 0
    same = capsys.readouterr().out
    assert "14 rows timed in both: 0 slower and 0 faster beyond noise, 14 within noise" in same
    assert "OK: no row slower than 1.5x" in same

    new_path = _write(tmp_path / "new.json", _slowed(base, "fake_a", "cpu", 2.0))
    assert cli.main(["bench", "--compare", base_path, new_path, "--fail-ratio", "1.5"]) == 1
    out = capsys.readouterr().out
    slowed = [line for line in out.splitlines() if line.startswith("fake_a") and " cpu " in line]
    assert len(slowed) == 2 and all("2.00x" in line and "SLOWER" in line for line in slowed)
    assert "FAIL (--fail-ratio 1.5)" in out and "fake_a n=1000 cpu (fakegpu): 2.00x slower, beyond noise" in out
    assert cli.main(["bench", "--compare", base_path, new_path]) == 0          # no threshold: report only
    assert cli.main(["bench", "--compare", base_path, new_path, "--fail-ratio", "2.5"]) == 0


def test_compare_judges_a_move_against_the_repeat_spread():
    row = dict(device="cpu", op="op", label="s", impl="cpu", note="")
    base = {"rows": [dict(row, median_ms=2.0, min_ms=1.0, max_ms=3.0)]}
    within = {"rows": [dict(row, median_ms=2.5, min_ms=1.5, max_ms=3.5)]}
    beyond = {"rows": [dict(row, median_ms=3.6, min_ms=3.5, max_ms=3.7)]}
    failed = {"rows": [dict(row, median_ms=float("nan"), min_ms=float("nan"), max_ms=float("nan"),
                            note="failed: RuntimeError: boom")]}
    assert compare.compare(base, within).pairs[0].verdict == compare.NOISE
    assert compare.compare(base, within).regressions(1.1) == []
    assert compare.compare(base, beyond).pairs[0].verdict == compare.SLOWER
    assert compare.compare(base, failed).regressions(1.1) == ["op s cpu: failed: RuntimeError: boom"]
    older = {"rows": [dict(row, median_ms=2.0)]}                 # a report from before the spread was recorded
    assert compare.compare(older, beyond).pairs[0].verdict == compare.UNKNOWN
    assert compare.compare(older, beyond).regressions(1.5) == ["op s cpu: 1.80x slower, no spread recorded"]


def test_compare_without_matching_rows_is_one_clear_line(tmp_path, capsys):
    base = _fake_gpu_report(progress=False)
    other = json.loads(json.dumps(base))
    other["quick"] = True
    for r in other["rows"]:
        r["label"] += " (other shape)"
    args = ["bench", "--compare", _write(tmp_path / "a.json", base), _write(tmp_path / "b.json", other)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no row is timed in both reports" in err and "quick" in err
    assert cli.main(["bench", "--compare", str(tmp_path / "missing.json"), str(tmp_path / "a.json")]) == 2
    assert "cannot read a bench report" in capsys.readouterr().err


def test_compare_against_a_new_run(tmp_path, monkeypatch, capsys):
    """--compare BASE alone runs the bench (here the fake suite on the CPU) and compares."""
    monkeypatch.setitem(SUITES, "fake", __name__)
    run = ["bench", "--suite", "fake", "--quick", "--no-progress", "--png", ""]
    assert cli.main(run + ["--json", str(tmp_path / "base.json")]) == 0
    assert cli.main(run + ["--json", str(tmp_path / "new.json"), "--compare", str(tmp_path / "base.json")]) == 0
    assert "10 rows timed in both" in capsys.readouterr().out     # --quick: no torch.compile rows


# ---- the plot ---------------------------------------------------------------------------------

def test_plot_has_a_speedup_and_a_limit_panel_per_operator(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    report = _fake_gpu_report(progress=False)
    fig = plot.build_figure(report)
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["fake_a: speed-up over reference (log)", "% of fake copy (probe, this run)",
                      "fake_b: speed-up over reference (log)", "% of fake copy (probe, this run)"]
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["n=1000:", "reference", "torch.compile(reference)", "cpu", "torch.exp",
                      "n=2000:", "reference", "torch.compile(reference)", "cpu", "torch.exp"]
    assert fig.axes[0].get_yticklabels()[3].get_color() == plot.FAST_COLOUR      # the fast backend stands out
    plt.close(fig)
    assert plot.write_plot(report, str(tmp_path / "p.png")) is None and (tmp_path / "p.png").stat().st_size > 0


# ---- self-timed cases and a separate error baseline (the harness side of the tabdiff suite) ----

def test_self_timed_cases_report_their_own_timing_and_details():
    def measured(seconds, value):
        return lambda: harness.Measured(devices.Timing(seconds, seconds, seconds, 1), torch.tensor([value]),
                                        note=f"ran {seconds} s", details={"sample": {"wall_s": seconds}})

    case = harness.Case(op="whole", label="run", impls={"reference": measured(2.0, 1.0), "cpu": measured(0.5, 1.5)},
                        bytes_moved=0, elements=100, compiled=None, self_timed=True)
    rows = {r.impl: r for r in harness.run_case(case, limit_gbps=10.0, skip_compiled=True)}
    assert rows["cpu"].median_ms == pytest.approx(500.0) and rows["cpu"].repeats == 1
    assert rows["cpu"].speedup_vs_baseline == pytest.approx(4.0) and rows["cpu"].max_rel_err == pytest.approx(0.5)
    assert rows["cpu"].note == "ran 0.5 s" and rows["cpu"].details == {"sample": {"wall_s": 0.5}}
    assert rows["cpu"].elements_per_s == pytest.approx(200.0) and rows["cpu"].gbps != rows["cpu"].gbps   # no bytes: NaN


def test_errors_can_compare_against_another_impl_than_the_speedup_baseline():
    x = torch.arange(4.0)
    case = harness.Case(op="op", label="s", bytes_moved=16, elements=4, baseline="eager", compiled=None,
                        impls={"eager": lambda: x * 7, "reference": lambda: x, "cpu": lambda: x * 1.5},
                        error_baseline="reference", no_error={"eager": "another generator"})
    rows = {r.impl: r for r in harness.run_case(case, limit_gbps=10.0, skip_compiled=True)}
    assert rows["eager"].max_rel_err is None and rows["eager"].note == "error n/a: another generator"
    assert rows["reference"].max_rel_err == 0.0 and rows["cpu"].max_rel_err == pytest.approx(0.5)
    assert rows["cpu"].baseline == "eager"


# ---- the tabdiff suite ------------------------------------------------------------------------

def test_the_tabdiff_suite_plans_and_builds_in_quick_mode():
    from diffkern.bench import tabdiff as tb

    plans = suite_plan("tabdiff", quick=True)
    assert [p.op for p in plans] == [tb.STEP_OP, tb.STEP_OP, tb.SAMPLE_OP]
    assert "all masked" in plans[0].label and "half masked" in plans[1].label and "L=113" in plans[0].label
    assert plans[0].impls[:3] == ("eager", "torch.compile(eager)", "reference") and plans[2].impls[0] == "reference"
    step, sample = harness._build(plans[1]), harness._build(plans[2])     # building runs nothing
    assert (step.baseline, step.compiled, step.error_baseline) == ("eager", "torch.compile(eager)", "reference")
    assert step.elements == 500 * (6 + 113) and set(step.no_error) == {"eager", "torch.compile(eager)"}
    assert sample.self_timed and sample.baseline == "reference" and sample.compiled is None
    rows = harness.run_case(step, limit_gbps=10.0, skip_compiled=True)      # quick shapes: a second
    assert {r.impl: r.max_rel_err for r in rows}["reference"] == 0.0
    assert all(r.note == "skipped (--quick)" for r in rows if r.impl.startswith("torch.compile"))


def _official_levels(n, m, sc_next):
    sigma = torch.linspace(1.0, 3.0, n)
    sc = torch.full((m,), 2.0)
    return dict(sigma_cur=sigma, sigma_hat=sigma * 1.02, sigma_next=sigma * 0.8, sc_cur=sc, sc_hat=sc * 1.05,
                sc_next=torch.full((m,), sc_next))


def test_the_official_style_eager_step_is_the_reference_step():
    """Valid categories, no MASK left when alpha_s = 1, and the reference's Euler output given the same noise."""
    from diffkern.bench import tabdiff as tb

    K = list(tb.ADULT_K)
    B, n, m = 400, tb.ADULT_N, len(K)
    x_num, x_cat, denoised, logits = tb.step_inputs(B, "half masked", seed=3)
    noise = torch.randn(B, n, generator=torch.Generator().manual_seed(4))
    levels = _official_levels(n, m, sc_next=0.0)                     # the last step: alpha_s = exp(0) = 1
    eager = tb.OfficialStyleStep(K)
    x_next, x_cat_next, d = eager(x_num, x_cat, denoised, logits, *levels.values(), noise=noise,
                                  generator=torch.Generator().manual_seed(5))
    assert bool(((x_cat_next >= 0) & (x_cat_next < torch.tensor(K))).all())          # no MASK, no padding slot
    t = tb.fused_tables(levels)
    with diffkern.use_backend("reference"):
        x_hat, _ = diffkern.ops.tabdiff_churn(x_num, x_cat, t["sigma_cur"], t["sigma_hat"], t["remask"], K,
                                              seed=0, step=0, noise=noise)
        ref_next, _, ref_d = diffkern.ops.tabdiff_step(x_hat, x_cat, denoised, logits, t["sigma_hat"], t["sigma_next"],
                                                       K, t["alpha_t"], t["alpha_s"], seed=0, step=0)
    torch.testing.assert_close(x_next, ref_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d, ref_d, rtol=1e-5, atol=1e-5)
    # mid-sampling: cells it does not re-mask keep their value, some masked cells stay masked
    levels = _official_levels(n, m, sc_next=1.0)
    levels["sc_hat"] = levels["sc_cur"]                              # no re-masking
    _, kept, _ = eager(x_num, x_cat, denoised, logits, *levels.values(), generator=torch.Generator().manual_seed(6))
    mask = torch.tensor(K).expand(B, -1)
    decoded = x_cat < mask
    assert torch.equal(kept[decoded], x_cat[decoded]) and bool((kept[~decoded] == mask[~decoded]).any())
    assert bool(((kept >= 0) & (kept <= torch.tensor(K))).all())


def test_the_time_split_is_exclusive_and_adds_up(monkeypatch):
    from diffkern.bench import tabdiff as tb

    ticks = iter(range(100))
    monkeypatch.setattr(tb.time, "perf_counter", lambda: float(next(ticks)))
    split = tb.TimeSplit()
    inner = split.wrap("step ops", "op", lambda: None)
    outer = split.wrap("network", "network", lambda: inner())
    outer()                                                          # ticks 0 .. 3: outer 2, inner 1
    assert dict(split.seconds) == {"network": 2.0, "step ops": 1.0} and split.calls == {"network": 1, "op": 1}
    shares = tb.split_shares(4.0, split.seconds)
    assert shares["seconds"]["rest"] == 1.0 and sum(shares["percent"].values()) == pytest.approx(100.0)


def test_the_sample_split_report_adds_up_to_100_percent():
    pytest.importorskip("pandas")
    pytest.importorskip("safetensors")
    from diffkern import ops
    from diffkern.bench import report, tabdiff as tb

    original = ops.tabdiff_step
    result = tb.measure_sample("reference", rows=12, steps=3)         # in this process: a second
    assert ops.tabdiff_step is original                                # the wrappers are removed
    assert result["calls"] == {"network": 5, "tabdiff_churn": 3, "tabdiff_step": 3, "tabdiff_heun": 2}
    assert sum(result["percent"].values()) == pytest.approx(100.0)
    assert all(v >= 0 for v in result["seconds"].values()) and result["peak_rss_mb"] > 0
    assert tuple(result["x_num"].shape) == (12, 6)
    note = tb.sample_note(result)
    assert note.startswith("network ") and "step ops" in note and "peak RSS" in note
    row = {"op": tb.SAMPLE_OP, "impl": "reference", "details": {"sample": {k: v for k, v in result.items()
                                                                            if k != "x_num"}}}
    table = report._sample_split_table([row])
    assert len(table) == 4 and "network %" in table[1] and table[3].startswith(tb.SAMPLE_OP)
