"""scripts/gpu_check.sh --check: the GPU check's dry run validates every step on this machine
(no GPU needed). The real run needs an NVIDIA GPU and a CUDA torch; see the script's header."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("DIFFKERN_TRITON_TESTS", None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--check", str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr + (tmp_path / "check.log").read_text()
    assert "check passed" in run.stdout and "check FAILED" not in run.stdout
    summary = (tmp_path / "summary.txt").read_text()
    for step in ("pip install --no-deps --no-build-isolation --no-index -e .", "-m cuda", "-k triton",
                 "bench --device cuda --no-progress --quick --json", "--budget-s"):
        assert step in summary, step
    assert "GPU steps not executed" in summary


def test_gpu_check_usage_errors():
    script = str(ROOT / "scripts" / "gpu_check.sh")
    assert subprocess.run(["bash", script], capture_output=True).returncode == 2          # OUT_DIR is required
    assert subprocess.run(["bash", script, "a", "b"], capture_output=True).returncode == 2
