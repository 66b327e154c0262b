"""The PoE-Bridge pair's training script (scripts/train_poe_bridge_models.py), a few steps only:
each model is the same whether it is trained alone, after the other or beside it, so the
default command reproduces a shipped pair whatever step the AR's stop rule picks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_poe_bridge_models.py"
TINY = ["--task", "modchain", "--ar-steps", "3", "--dlm-steps", "3", "--eval-every", "1", "--eval-problems", "4"]


def _train(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--out", str(out), *extra],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _weights(out, name):
    return (out / name / "model.safetensors").read_bytes()


def test_each_model_is_the_same_trained_in_sequence_in_parallel_or_alone(tmp_path):
    seq, par, alone = tmp_path / "seq", tmp_path / "par", tmp_path / "alone"
    _train(seq)
    assert "both models trained" in _train(par, "--parallel")
    _train(alone, "--only", "dlm")             # no AR at all: the DLM's streams are its own
    for name in ("ar", "dlm"):
        assert _weights(seq, name) == _weights(par, name), name
    assert _weights(alone, "dlm") == _weights(seq, "dlm")
    assert not (alone / "ar").exists()
    for out in (seq, par, alone):
        assert (out / "tokenizer" / "tokenizer.json").read_bytes() == (seq / "tokenizer" / "tokenizer.json").read_bytes()


def test_bad_arguments_name_the_flag(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--eval-problems", "0", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--eval-problems must be at least 1" in run.stderr
    run = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--parallel", "--only", "ar", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "cannot be combined with --only" in run.stderr
