"""The `diffkern` command line: `info` and the `bench` output switches (quick shapes)."""

import json

from diffkern import cli


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    assert "cpu" in capsys.readouterr().out


def test_bench_writes_json_and_png_or_skips_png(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    args = ["bench", "--quick", "--suite", "chebyshev", "--no-progress", "--json", str(out)]
    assert cli.main(args + ["--png", ""]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert rows and {r["op"] for r in rows} >= {"chebyshev_forecast"}
    assert list(tmp_path.glob("*.png")) == []          # '' means no plot, not a file named '.png'
    assert cli.main(args + ["--png", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 0


def test_python_dash_m_diffkern_is_the_command_line():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "diffkern", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "bench" in out.stdout and "demo" in out.stdout
