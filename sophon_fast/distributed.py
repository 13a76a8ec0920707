"""torch.distributed glue: simulated trajectories across ranks, NTR data-parallel, one all-reduce path.

Every rank runs the same loop with the same seed, so every host-side choice and every random draw
(batches, head re-initialisations) is made identically on every rank. The iteration's planned
trajectories are dealt out round-robin (trajectory i runs on rank i % world); a rank replays the random
draws of the trajectories it does not run (``mode.skip_trajectory``) so the streams stay in step. Each
rank accumulates its trajectories into its own meta-gradient buffer; one all-reduce (SUM) of that buffer
combines them, and every rank takes the same FTS step. NTR steps split every original batch into
``world`` row shards whose gradients the same all-reduce adds up. The result does not depend on the
number of ranks (up to the order of floating-point additions; BatchNorm layers see per-shard statistics
in NTR). Only rank 0 writes checkpoints and shows progress; every rank reads the checkpoint to resume
(a shared file system).

A model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``; its parameters are DTensors) runs
*sharded* instead (``World(sharded=True)``, sophon_fast.engine.modes.ShardedMode): every rank runs every
trajectory on its rows of each batch, FSDP2's reduce-scatter (set to a plain sum for the run) combines the
gradients into each rank's shard, and the meta-gradient, optimiser states and backups stay sharded.

Works inside any initialised default process group (gloo on CPU, NCCL on GPUs); ``init_from_env``
initialises one for ``torchrun``. A rank that dies makes the others raise ``DistributedError`` at their
next collective (gloo sees the closed connection; otherwise the process group's timeout) instead of hanging
silently.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Sequence

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A collective failed: another rank died or timed out."""


class World:
    """This process's place among the ranks (a single process: rank 0 of 1, every collective a no-op)."""

    def __init__(self, sharded: bool = False):
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.active else 0
        self.size = dist.get_world_size() if self.active else 1
        self.sharded = sharded and self.active   # FSDP2: every rank runs every trajectory on its rows

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mine(self, i: int) -> bool:
        """True when planned trajectory ``i`` runs on this rank (sharded: every rank runs its rows of each)."""
        return self.sharded or i % self.size == self.rank

    def shard(self, n: int) -> slice:
        """This rank's contiguous rows of an n-row batch (every rank gets n // size or one more)."""
        lo = self.rank * n // self.size
        return slice(lo, (self.rank + 1) * n // self.size)

    def my_rows(self, batch, weigh=len):
        """This rank's rows of ``batch`` (a tuple of tensors sharing dim 0) and their share of its loss weight
        ``weigh(batch)`` (Task.loss_weight: rows, or counted tokens as a 0-d tensor, then no host sync)."""
        if not self.active:
            return batch, 1.0
        mine = tuple(t[self.shard(len(batch[0]))] for t in batch)
        return mine, weigh(mine) / weigh(batch)

    def all_reduce_(self, tensors: Sequence[torch.Tensor], what: str) -> None:
        """Sum ``tensors`` in place over the ranks (a flat buffer is one collective)."""
        if not self.active:
            return
        try:
            for t in tensors:
                dist.all_reduce(t)
        except Exception as e:   # gloo/NCCL raise RuntimeError (or DistBackendError) when a peer is gone
            raise DistributedError(f"protect: rank {self.rank} of {self.size}: the all-reduce of {what} failed; "
                                   f"another rank probably died or timed out ({type(e).__name__}: {e})") from e

    def combine_(self, grads: Sequence[torch.Tensor], what: str) -> None:
        """Sum the ranks' gradient buffers: one all-reduce, or nothing when sharded (FSDP2's reduce-scatter
        already summed each shard during backward)."""
        if not self.sharded:
            self.all_reduce_(grads, what)

    def mean_loss(self, losses: torch.Tensor, what: str) -> float:
        """The mean of the query losses over all trajectories of the iteration (one small collective). Sharded,
        every rank holds its rows' share of the same trajectories' losses, and the shares add up."""
        total, count = self.sum_scalars([float(losses.sum()), losses.numel()], losses.device, what)
        return total / (count / self.size if self.sharded else count)

    def sum_scalars(self, values: List[float], device, what: str) -> List[float]:
        """Python floats summed over the ranks (one small collective)."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        self.all_reduce_([t], what)
        return t.tolist()


def init_from_env(timeout_s: float = 300.0) -> bool:
    """Initialise the default process group from torchrun's environment (WORLD_SIZE > 1) unless one exists:
    NCCL when CUDA is available (one GPU per LOCAL_RANK), else gloo. True when a group is active."""
    if not dist.is_available() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True
