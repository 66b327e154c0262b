"""pytest-benchmark view of the `diffkern bench` cases (quick shapes).

    .venv/bin/python -m pytest bench/ --benchmark-enable --benchmark-json bench/results/quick.json

The main job is `diffkern bench` (full shapes, one table); this suite exists so the same cases
can be tracked with pytest-benchmark's comparison tools. Timings are never asserted.
"""

import pytest

from diffkern.bench import SUITES, suite_cases


def _impls():
    for suite in SUITES:
        for case in suite_cases(suite, quick=True):
            for name, fn in {**case.impls, **case.extra}.items():
                if not name.startswith("torch.compile") and name not in case.skipped:
                    yield pytest.param(fn, case.self_timed, id=f"{case.op}|{case.label}|{name}")


@pytest.mark.parametrize("fn, self_timed", list(_impls()))
def test_bench(benchmark, fn, self_timed):
    # a self-timed case (a whole sample() in a fresh process) runs once: it times itself
    benchmark.pedantic(fn, rounds=1 if self_timed else 5, warmup_rounds=0 if self_timed else 1, iterations=1)
