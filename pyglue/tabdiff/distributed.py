"""Data-parallel TabDiff on ``torch.distributed``: DDP training and sharded sampling.

Two ways in, one code path:

* **torchrun** (``torchrun --nproc_per_node=N -m diffkern.tabdiff fit ...``): the CLI joins the
  process group torchrun describes (:func:`init_from_environment`); ``fit``/``sample`` see an
  initialised group and work on their shard.
* **nproc** (``fit(..., nproc=N)``, ``sample(..., nproc=N)``, ``--nproc N``): :func:`spawn`
  starts N local processes joined in a gloo group, each running the same ``fit``/``sample``; the
  result comes back to the calling process.

Why the result does not depend on the number of processes:

* **Training.** Every process holds the same generator, so every process draws the same epoch
  permutation and the whole *global* batch's randomness (t, noise, gumbel corruption) and keeps
  the contiguous slice of rows it trains on (:func:`contiguous_slice`). A row's draws are those a
  single process would use; the generator stream is the single-process stream, so existing runs
  and checkpoints are unchanged. Each shard's loss is its share of the global-batch mean and the
  gradient is DDP's all-reduce, so one optimiser step equals the single-process step up to float
  rounding (sums in another order); the logged, plateau and finiteness losses are all-reduced
  and identical on every process, so are the parameters and the EMA. Only rank 0 writes files.
* **Sampling.** The sampler keys every random number by (seed, step, global row, column); a
  process samples a contiguous range of *whole batches* of the single-process batch grid
  (:func:`batch_aligned_range`), so every network call sees exactly the rows it sees in one
  process and the gathered table is bit-identical. (Splitting inside a batch would change the
  shapes of the CPU kernels' calls, whose rounding depends on them.)

TabDiff trains on the CPU, so the group's backend is gloo (a torchrun user on GPUs may
initialise ``"cpu:gloo,cuda:nccl"``; plain NCCL cannot reduce CPU tensors and is refused).
"""

from __future__ import annotations

import numbers
import os
import pickle
import tempfile
from typing import Callable, Optional

import torch
from torch import Tensor, nn

RESULT_NAME = "result.pt"


# ---- where this process stands -------------------------------------------------------------

def active() -> bool:
    """True inside an initialised process group (torchrun, or a process :func:`spawn` started)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    if not active():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def contiguous_slice(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that ``rank`` of ``size`` takes: contiguous, sizes differ by at most 1."""
    return n * rank // size, n * (rank + 1) // size


def batch_aligned_range(num_rows: int, batch_size: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that ``rank`` samples: a contiguous run of whole batches of the
    single-process grid ``[0, batch_size), [batch_size, 2 batch_size), ...`` (possibly none)."""
    first, last = contiguous_slice(-(-num_rows // batch_size), rank, size)
    return min(num_rows, first * batch_size), min(num_rows, last * batch_size)


# ---- collectives (identities in a single process) -------------------------------------------

def _collective_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_reduce_sum(*values: float) -> list[float]:
    """The sums over processes of ``values`` (float64), the same on every process."""
    if world()[1] == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    torch.distributed.all_reduce(total)
    return total.tolist()


def any_process(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (e.g. one of them got Ctrl-C)."""
    return all_reduce_sum(float(flag))[0] > 0


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def all_gather_rows(x_num: Tensor, x_cat: Tensor) -> tuple[Tensor, Tensor]:
    """Every process's rows, concatenated in rank order, on every process."""
    size = world()[1]
    if size == 1:
        return x_num, x_cat
    parts: list = [None] * size
    torch.distributed.all_gather_object(parts, (x_num, x_cat))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---- training ------------------------------------------------------------------------------

class _ShardLoss(nn.Module):
    """``model.loss`` as a module's forward: DDP synchronises gradients of what its forward ran."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_num, x_cat, noise, total_rows):
        return self.model.loss(x_num, x_cat, noise=noise, total_rows=total_rows)


def training_loss(model: nn.Module) -> nn.Module:
    """A module computing ``model.loss``; DDP-wrapped inside a process group of several processes."""
    loss = _ShardLoss(model)
    if world()[1] == 1:
        return loss
    backend = str(torch.distributed.get_backend())
    if backend == "nccl":
        raise RuntimeError("TabDiff trains on the CPU and NCCL cannot reduce CPU tensors: initialise the process "
                           "group with backend 'gloo' (or 'cpu:gloo,cuda:nccl')")
    # an all-numerical or all-categorical table has empty parameters of the other kind that never
    # get a gradient; only then must DDP look for unused parameters (an extra graph walk a step)
    unused = any(p.numel() == 0 for p in model.parameters() if p.requires_grad)
    return nn.parallel.DistributedDataParallel(loss, find_unused_parameters=unused)


def check_batch_rows(nproc: int, rows: int, batch_size: int) -> None:
    """Every process must get rows of every full global batch: ``nproc <= min(batch_size, rows)``."""
    per_batch = min(batch_size, rows)
    if nproc > per_batch:
        raise ValueError(f"nproc: {nproc} processes but a global batch has only {per_batch} rows "
                         f"(batch_size={batch_size}, {rows} training rows); some process would get no rows. "
                         f"Use nproc <= {per_batch}")


def check_checkpoint_world_size(saved: int, current: int, where: str) -> None:
    """A checkpoint resumes only under the world size that wrote it (the float rounding of the
    gradient all-reduce depends on it, so another size could not continue the run exactly)."""
    if saved != current:
        raise ValueError(f"resume: the checkpoint in {where!r} was written by {saved} process(es) and this run has "
                         f"{current}; resume with nproc={saved} (torchrun --nproc_per_node={saved})")


# ---- launching -----------------------------------------------------------------------------

def init_from_environment() -> bool:
    """Join the gloo process group that torchrun describes in the environment (``WORLD_SIZE`` > 1,
    ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``). True when this call created the group (the caller
    destroys it); False when not launched by torchrun or already in a group."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    torch.distributed.init_process_group("gloo")
    return True


def _worker_entry(rank: int, nproc: int, port: int, folder: str, worker: Callable, args: tuple) -> None:
    # like torchrun: one thread per process unless the caller chose (OMP_NUM_THREADS)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    store = torch.distributed.TCPStore("127.0.0.1", port, is_master=False)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=nproc)
    try:
        result = worker(*args)
        if rank == 0:
            torch.save(result, os.path.join(folder, RESULT_NAME))
    except BaseException as exc:                # KeyboardInterrupt too: the parent re-raises it
        with open(os.path.join(folder, f"error-{rank}.pkl"), "wb") as f:
            pickle.dump(exc, f)
        raise
    finally:
        torch.distributed.destroy_process_group()


def _raise_worker_error(folder: str, nproc: int) -> None:
    for rank in range(nproc):
        path = os.path.join(folder, f"error-{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                raise pickle.load(f)


def spawn(worker: Callable, nproc: int, *args):
    """``worker(*args)`` in ``nproc`` fresh local processes joined in one gloo group; returns rank 0's
    result. A worker's exception (Ctrl-C included) is raised here, the lowest rank's first."""
    import torch.multiprocessing as mp

    # the rendezvous store listens on a port the OS picks (port 0): concurrent runs never collide
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="diffkern-tabdiff-") as folder:
        context = mp.start_processes(_worker_entry, args=(nproc, store.port, folder, worker, args), nprocs=nproc,
                                     join=False, start_method="spawn")
        failure = None
        while True:
            try:
                if context.join():
                    break
            except KeyboardInterrupt:
                continue             # the workers got the same Ctrl-C and stop together at a batch boundary
            except Exception as exc:  # noqa: BLE001  (a worker failed; its own exception is raised below)
                failure = exc
                break
        _raise_worker_error(folder, nproc)
        if failure is not None:
            raise failure
        result_path = os.path.join(folder, RESULT_NAME)
        if not os.path.exists(result_path):
            raise KeyboardInterrupt("interrupted before rank 0 finished")
        return torch.load(result_path, weights_only=False)   # written just now by our own rank 0


def _fit_worker(config, overrides, data, fit_kwargs: dict):
    from .synthesizer import TabDiffSynthesizer

    return TabDiffSynthesizer(config, schema=overrides).fit(data, **fit_kwargs)


def fit_in_processes(synth, data, nproc: int, rows: int, fit_kwargs: dict):
    """``synth.fit(data, **fit_kwargs)`` trained by ``nproc`` spawned processes on a table of
    ``rows`` rows; returns the fitted synthesizer. Bad input is refused before any process starts."""
    from .training import Trainer

    check_batch_rows(nproc, rows, synth.config.batch_size)
    resume = fit_kwargs.get("resume")
    if resume is not None:
        check_checkpoint_world_size(int(Trainer.read_checkpoint(resume).get("world_size", 1)), nproc, resume)
    return spawn(_fit_worker, nproc, synth.config, synth.overrides, data, fit_kwargs)


def _sample_worker(synth, sampler_kwargs: dict):
    return synth._run_sampler(**sampler_kwargs)


def sample_in_processes(synth, nproc: int, num_rows: int, batch_size: int, sampler_kwargs: dict):
    """``synth._run_sampler(**sampler_kwargs)`` with the rows shared by ``nproc`` spawned processes."""
    batches = -(-num_rows // batch_size)
    if nproc > batches:
        raise ValueError(f"nproc: {nproc} processes but {num_rows} rows make only {batches} batch(es) of "
                         f"batch_size={batch_size}; a process samples whole batches, so pass batch_size <= "
                         f"{-(-num_rows // nproc)} or nproc <= {batches}")
    return spawn(_sample_worker, nproc, synth, sampler_kwargs)


def nproc_argument(nproc: Optional[int]) -> int:
    """The validated ``nproc`` (None: 1); under torchrun it must equal the world size."""
    if nproc is None:
        return world()[1]
    if isinstance(nproc, bool) or not isinstance(nproc, numbers.Integral) or nproc < 1:
        raise ValueError(f"nproc: expected an int >= 1, got {nproc!r}")
    nproc = int(nproc)
    if active() and nproc != world()[1]:
        raise ValueError(f"nproc: {nproc} asked inside a process group of {world()[1]} processes (torchrun); "
                         "leave nproc unset there")
    return nproc
