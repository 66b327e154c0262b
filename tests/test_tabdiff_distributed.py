"""Distributed TabDiff: world-size and batch-size invariance of sampling, DDP training against one
process, resume under DDP, rank-0 artifacts, bad nproc. Two gloo processes on a tiny table.

The real multi-process runs are few and shared (process start, i.e. importing torch, dominates
them): one 2-process group runs the DDP fits, an interrupted fit and its resume, and a sample
(the torchrun path, module fixture ``ddp``); the CLI runs ``fit --nproc 2`` and ``sample --nproc 2``
(the spawning path)."""

import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch

from diffkern.tabdiff import TabDiffConfig, TabDiffSynthesizer, distributed
from diffkern.tabdiff import cli
from diffkern.tabdiff.sampler import sample_rows
from diffkern.tabdiff.training import Trainer

# 65 rows in batches of 16: four full global batches and one of a single row, so one of the two
# processes has an empty shard in the last batch of every epoch
CONFIG = dict(dim_t=16, ffn_factor=2, batch_size=16, epochs=3, steps=4, guidance_dim_t=16, checkpoint_every=1)
ROWS, SEED, TARGET = 65, 0, "c"
SAMPLE = dict(num_rows=120, seed=3, batch_size=25)          # 5 batches: 3 on rank 0, 2 on rank 1
# Tolerance of DDP against one process. The randomness is the same by construction; what differs
# is float32 rounding: each shard's loss is reduced over its rows and the gradients summed by
# the all-reduce, in another order than one process sums them (~1e-7 relative per step), and Adam
# can amplify that in coordinates whose gradient is near zero. Measured over these 15 steps:
# 1.7e-7 relative at most (1-2 float32 ulps); draws from another stream (what rank-local
# generators would give) differ by 1.2e-2 at least, 0.39 in the median.
LOSS_RTOL = 1e-5


def tiny_table(n=ROWS, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.gamma(2.0, size=n),
                         "c": rng.choice(list("xyz"), n), "d": rng.choice(["p", "q"], n)})


def config() -> TabDiffConfig:
    return TabDiffConfig(**CONFIG)


def losses(steps: list[dict]) -> np.ndarray:
    return np.array([[s["loss_cat"], s["loss_num"]] for s in steps])


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# ---- the 2-process group (torchrun path: fit and sample see an initialised group) ---------------

def _interrupting_run_batch(original, at_call):
    calls = {"n": 0}

    def run_batch(self, idx, weight):
        original(self, idx, weight)
        calls["n"] += 1
        if calls["n"] == at_call and distributed.world()[0] == 0:    # Ctrl-C reaches rank 0 only
            os.kill(os.getpid(), signal.SIGINT)
    return run_batch


def _ddp_worker(folder: str) -> dict:
    df = tiny_table()
    fit = dict(target=TARGET, seed=SEED, progress=False)
    whole = TabDiffSynthesizer(config()).fit(df, checkpoint_dir=os.path.join(folder, "whole"), **fit)

    cut = os.path.join(folder, "cut")
    original = Trainer._run_batch
    Trainer._run_batch = _interrupting_run_batch(original, at_call=7)     # epoch 2, batch 2
    try:
        TabDiffSynthesizer(config()).fit(df, checkpoint_dir=cut, **fit)
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        Trainer._run_batch = original
    resumed = TabDiffSynthesizer(config()).fit(df, checkpoint_dir=cut, resume=cut, **fit)

    table = whole.sample(**SAMPLE, progress=False)
    rank, size = distributed.world()
    everyone: list = [None] * size
    torch.distributed.all_gather_object(everyone, (interrupted, whole.model.state_dict(), table))
    return dict(whole=whole, resumed=resumed, table=table, checkpoint=cut,
                all_interrupted=all(e[0] for e in everyone),
                same_ema_on_all_ranks=all(all(torch.equal(everyone[0][1][k], e[1][k]) for k in e[1]) for e in everyone),
                same_table_on_all_ranks=all(e[2].equals(everyone[0][2]) for e in everyone))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    return distributed.spawn(_ddp_worker, 2, str(tmp_path_factory.mktemp("ddp")))


@pytest.fixture(scope="module")
def single():
    return TabDiffSynthesizer(config()).fit(tiny_table(), target=TARGET, seed=SEED, progress=False)


def test_ddp_loss_trajectory_matches_one_process(ddp, single):
    two = ddp["whole"]
    assert len(two.step_losses) == len(single.step_losses) == 3 * 5
    np.testing.assert_allclose(losses(two.step_losses), losses(single.step_losses), rtol=LOSS_RTOL, atol=0)
    assert [h["lr"] for h in two.history] == [h["lr"] for h in single.history]
    np.testing.assert_allclose([h["loss_cat"] for h in two.history], [h["loss_cat"] for h in single.history],
                               rtol=LOSS_RTOL)
    assert ddp["same_ema_on_all_ranks"]


def test_rank_dependent_randomness_would_be_caught(single, monkeypatch):
    """The tolerance is discriminating: a one-process run whose per-row draws come from another
    stream (what a rank-local generator would give) misses the trajectory by far more."""
    original = Trainer._run_batch

    def other_draws(self, idx, weight):
        self.generator.manual_seed(1000 + self.cursor.next_batch)
        original(self, idx, weight)

    monkeypatch.setattr(Trainer, "_run_batch", other_draws)
    other = TabDiffSynthesizer(config()).fit(tiny_table(), seed=SEED, progress=False)
    ours, theirs = losses(single.step_losses), losses(other.step_losses)
    assert (np.abs(theirs - ours) > 100 * LOSS_RTOL * np.abs(ours)).mean() > 0.5


def test_resume_under_ddp_continues_the_same_run(ddp):
    whole, resumed = ddp["whole"], ddp["resumed"]
    assert ddp["all_interrupted"]                        # Ctrl-C on rank 0 stopped both processes
    assert resumed.history == whole.history
    assert states_equal(resumed.model, whole.model) and states_equal(resumed.guidance_model, whole.guidance_model)
    tail = whole.step_losses[-len(resumed.step_losses):]
    assert resumed.step_losses == tail and 0 < len(tail) < len(whole.step_losses)


def test_checkpoint_of_two_processes_refuses_one(ddp):
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) and this run has 1"):
        TabDiffSynthesizer(config()).fit(tiny_table(), target=TARGET, seed=SEED, progress=False,
                                         resume=ddp["checkpoint"])


def test_sampling_in_a_process_group_equals_one_process(ddp):
    whole = ddp["whole"]
    pd.testing.assert_frame_equal(ddp["table"], whole.sample(**SAMPLE, progress=False), check_exact=True)
    assert ddp["same_table_on_all_ranks"]


# ---- the spawning path: the CLI's --nproc ----------------------------------------------------------

def test_cli_nproc_fit_writes_an_artifact_that_loads_anywhere_and_samples_the_same(ddp, tmp_path):
    import json

    data, model, out = tmp_path / "train.csv", tmp_path / "m.tabdiff", tmp_path / "fake.csv"
    tiny_table().to_csv(data, index=False)
    assert cli.main(["fit", str(data), "-o", str(model), "--target", TARGET, "--seed", str(SEED),
                     "--config", json.dumps(CONFIG), "--nproc", "2"]) == 0
    loaded = TabDiffSynthesizer.load(str(model))                          # a plain single process
    whole = ddp["whole"]
    assert states_equal(loaded.model, whole.model) and loaded.history == whole.history
    assert cli.main(["sample", str(model), "-n", str(SAMPLE["num_rows"]), "-o", str(out), "--seed",
                     str(SAMPLE["seed"]), "--batch-size", str(SAMPLE["batch_size"]), "--nproc", "2"]) == 0
    single = tmp_path / "single.csv"
    loaded.sample(**SAMPLE, progress=False).to_csv(single, index=False)
    assert out.read_bytes() == single.read_bytes()


# ---- invariance without processes -------------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3, 5])
def test_rows_sampled_as_contiguous_ranges_equal_one_range(single, size):
    n, bs = SAMPLE["num_rows"], SAMPLE["batch_size"]
    kw = dict(seed=SAMPLE["seed"], batch_size=bs, steps=4, progress=False)
    whole = sample_rows(single.model, n, **kw)
    ranges = [distributed.batch_aligned_range(n, bs, rank, size) for rank in range(size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and all(r[0] % bs == 0 for r in ranges)
    parts = [sample_rows(single.model, stop - start, row_start=start, **kw) for start, stop in ranges]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_batch_size_invariance(single):
    """One batch or several: the same random numbers per row. The categories come out identical;
    the numerical values agree to float32 rounding, not bit for bit, because the CPU kernels
    (MKL GEMM, vectorised SiLU/pow/softplus with scalar tails) round a row differently
    depending on the batch's shape."""
    kw = dict(seed=SAMPLE["seed"], steps=4, progress=False)
    one = sample_rows(single.model, SAMPLE["num_rows"], batch_size=SAMPLE["num_rows"], **kw)
    for bs in (7, 25):
        several = sample_rows(single.model, SAMPLE["num_rows"], batch_size=bs, **kw)
        assert torch.equal(several[1], one[1])
        torch.testing.assert_close(several[0], one[0], rtol=0, atol=1e-4)
    other_seed = sample_rows(single.model, SAMPLE["num_rows"], batch_size=25, seed=4, steps=4, progress=False)
    assert not torch.equal(other_seed[1], one[1])


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,match", [
    (lambda s: TabDiffSynthesizer(config()).fit(tiny_table(), nproc=0, progress=False), "nproc: expected an int"),
    (lambda s: TabDiffSynthesizer(config()).fit(tiny_table(), nproc=True, progress=False), "nproc: expected an int"),
    (lambda s: TabDiffSynthesizer(config()).fit(tiny_table(), nproc=17, progress=False),
     r"nproc: 17 processes but a global batch has only 16 rows"),
    (lambda s: TabDiffSynthesizer(config()).fit(tiny_table(10), nproc=11, progress=False),
     r"nproc: 11 processes but a global batch has only 10 rows"),
    (lambda s: s.sample(50, batch_size=50, nproc=2, progress=False), r"nproc: 2 processes but 50 rows make only 1"),
    (lambda s: s.sample(50, nproc=2.0, progress=False), "nproc: expected an int"),
])
def test_bad_nproc_is_refused_before_any_process_starts(single, call, match):
    with pytest.raises(ValueError, match=match):
        call(single)
