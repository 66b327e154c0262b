"""Training loop of the official trainer (AdamW, ReduceLROnPlateau on the epoch loss, EMA, the
annealed numerical loss weight) that survives interruption.

Everything random comes from one ``torch.Generator`` seeded by ``seed`` (shuffling, t, noise,
gumbel corruption), so a CPU run is deterministic. A checkpoint holds the model, its EMA, the
optimiser, the LR scheduler, the generator state and the position *inside* the epoch (its
permutation, the next batch, the running loss sums); Ctrl-C is deferred to the next batch
boundary, writes a checkpoint there and then raises. Resuming from any checkpoint therefore
continues exactly the uninterrupted run.

Inside a process group (torchrun, or ``nproc=``) the network is wrapped in DDP and every process
trains on a contiguous slice of each global batch; the randomness of the whole batch is drawn on
every process from the shared generator, so the run matches one process to float rounding (see
:mod:`diffkern.tabdiff.distributed`). Only rank 0 writes checkpoints; a checkpoint records its
world size and resumes only under that size.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import signal
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

from . import distributed
from .config import TabDiffConfig
from .diffusion import TabDiffModel

CHECKPOINT_NAME = "checkpoint.pt"


class TrainingError(FloatingPointError):
    """The loss became non-finite; the message names the epoch."""


@dataclasses.dataclass
class EpochCursor:
    """Where training stands: the epoch, its batch order, the next batch and the loss sums so far."""
    epoch: int = 0
    perm: Optional[Tensor] = None
    next_batch: int = 0
    d_sum: float = 0.0
    c_sum: float = 0.0
    count: int = 0


def ema_decay(configured: float, updates: int) -> float:
    """The configured decay, warmed up as ``(1 + u) / (10 + u)`` over the first updates so that a
    short run (a small table has one batch per epoch) does not keep the random initialisation."""
    return min(configured, (1.0 + updates) / (10.0 + updates))


def _ema_update(ema: TabDiffModel, model: TabDiffModel, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


@contextlib.contextmanager
def _deferred_sigint():
    """Record Ctrl-C instead of raising mid-update; the loop checks ``flag['hit']`` between batches."""
    flag = {"hit": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["hit"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Trains ``model`` on ``x_num [N, n]`` float / ``x_cat [N, m]`` int64 for ``config.epochs`` epochs."""

    def __init__(self, model: TabDiffModel, config: TabDiffConfig, x_num: Tensor, x_cat: Tensor, *, seed: int,
                 epochs: Optional[int] = None, checkpoint_dir: Optional[str] = None, metadata: Optional[dict] = None,
                 progress: bool = True, desc: str = "training"):
        self.model, self.config = model, config
        self.x_num, self.x_cat = x_num, x_cat
        self.epochs = epochs if epochs is not None else config.epochs
        self.checkpoint_dir, self.metadata, self.progress, self.desc = checkpoint_dir, metadata or {}, progress, desc
        self.ema = copy.deepcopy(model).requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=config.lr_factor, patience=config.lr_patience)
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor = EpochCursor()
        self.ema_updates = 0
        self.history: list[dict] = []
        self.step_losses: list[dict] = []     # per optimiser step of this run (not checkpointed)
        self.rank, self.world_size = distributed.world()
        if self.world_size > 1:
            distributed.check_batch_rows(self.world_size, x_num.shape[0], config.batch_size)
            self.progress = progress and self.rank == 0
        self.loss_module = distributed.training_loss(model)

    # ---- checkpoints -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.generator.get_state(), "cursor": dataclasses.asdict(self.cursor),
                "history": self.history, "epochs": self.epochs, "metadata": self.metadata,
                "ema_updates": self.ema_updates, "world_size": self.world_size}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        # checkpoints written before distributed training have no world size: one process
        distributed.check_checkpoint_world_size(int(state.get("world_size", 1)), self.world_size, where)
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        self.cursor = EpochCursor(**state["cursor"])
        self.history = list(state["history"])
        self.ema_updates = int(state["ema_updates"])

    def save_checkpoint(self, path: Optional[str] = None) -> Optional[str]:
        path = path or (os.path.join(self.checkpoint_dir, CHECKPOINT_NAME) if self.checkpoint_dir else None)
        if path is None or self.rank != 0:      # every process holds the same state: rank 0 writes it
            return path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)          # never leave a half-written checkpoint
        return path

    @staticmethod
    def read_checkpoint(path: str) -> dict:
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume: no checkpoint at {path!r}")
        return torch.load(path, map_location="cpu", weights_only=True)

    # ---- the loop ----------------------------------------------------------------------------

    def _update_ema(self) -> None:
        _ema_update(self.ema, self.model, ema_decay(self.config.ema_decay, self.ema_updates))
        self.ema_updates += 1

    def _closs_weight(self, epoch: int) -> float:
        return 1.0 - epoch / self.epochs if self.config.closs_weight == "anneal" else 1.0

    def _run_batch(self, idx: Tensor, closs_weight: float) -> None:
        """One optimiser step on the global batch ``idx``; this process trains on its slice of it."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        noise = self.model.draw_noise(len(idx), self.generator)     # the whole global batch's draws
        start, stop = distributed.contiguous_slice(len(idx), self.rank, self.world_size)
        rows = idx[start:stop]
        sharded = self.world_size > 1
        d_loss, c_loss = self.loss_module(self.x_num[rows], self.x_cat[rows], noise.rows(start, stop),
                                          len(idx) if sharded else None)
        loss = d_loss + closs_weight * c_loss
        # DDP averages the shards' gradients; each loss is its shard's share of the global mean
        (loss * self.world_size if sharded else loss).backward()
        self.optimizer.step()
        if self.config.ema_every == "step":
            self._update_ema()
        d, c = distributed.all_reduce_sum(d_loss.item(), c_loss.item())    # the global batch's losses
        self.step_losses.append({"epoch": self.cursor.epoch + 1, "batch": self.cursor.next_batch,
                                 "loss_cat": d, "loss_num": c})
        cur = self.cursor
        cur.d_sum += d * len(idx)
        cur.c_sum += c * len(idx)
        cur.count += len(idx)
        cur.next_batch += 1

    def _end_epoch(self) -> dict:
        cur = self.cursor
        d, c = cur.d_sum / cur.count, cur.c_sum / cur.count
        if not (math.isfinite(d) and math.isfinite(c)):
            raise TrainingError(f"epoch {cur.epoch + 1}: the training loss is not finite (categorical {d}, "
                                f"numerical {c}); lower lr or check the input for extreme values")
        self.scheduler.step(d + c)
        if self.config.ema_every == "epoch":
            self._update_ema()
        record = {"epoch": cur.epoch + 1, "loss_cat": d, "loss_num": c,
                  "lr": self.optimizer.param_groups[0]["lr"]}
        self.history.append(record)
        self.cursor = EpochCursor(epoch=cur.epoch + 1)
        return record

    def run(self, on_epoch: Optional[Callable[[dict], None]] = None) -> list[dict]:
        from tqdm.auto import tqdm

        N, bs = self.x_num.shape[0], self.config.batch_size
        bar = tqdm(total=self.epochs, initial=self.cursor.epoch, desc=self.desc, unit="epoch",
                   disable=not self.progress)
        try:
            with _deferred_sigint() as sigint:
                while self.cursor.epoch < self.epochs:
                    cur = self.cursor
                    if cur.perm is None:
                        cur.perm = torch.randperm(N, generator=self.generator)
                    batches = cur.perm.split(bs)
                    for idx in batches[cur.next_batch:]:
                        self._run_batch(idx, self._closs_weight(cur.epoch))
                        if distributed.any_process(sigint["hit"]):   # all processes stop at the same batch
                            where = self.save_checkpoint()
                            distributed.barrier()                     # rank 0 has written it
                            raise KeyboardInterrupt(f"training interrupted at epoch {cur.epoch + 1}; "
                                                    + (f"checkpoint written to {where} (resume= it)" if where
                                                       else "no checkpoint_dir was given, nothing saved"))
                    record = self._end_epoch()
                    bar.update(1)
                    bar.set_postfix(loss_cat=f"{record['loss_cat']:.4f}", loss_num=f"{record['loss_num']:.4f}")
                    if on_epoch is not None:
                        on_epoch(record)
                    if self.checkpoint_dir and (self.cursor.epoch % self.config.checkpoint_every == 0
                                                or self.cursor.epoch == self.epochs):
                        self.save_checkpoint()
        finally:
            bar.close()
        return self.history
