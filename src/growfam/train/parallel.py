"""Processes, devices and gradient reduction: the one seam where several GPUs plug in.

`make_parallelism(device)` is called once per run and returns the strategy the loop talks to;
nothing else in train/ calls torch.distributed. Today there are two:

- `Parallelism`: one process, rank 0 of a world of 1; every reduction is a no-op.
- `AllReduce`: several processes under torchrun, each holding the whole model; after a step's
  micro-batches the gradients (and the loss) are averaged over ranks, one tensor at a time.

DDP and FSDP2 fill in the same methods: `wrap` (DDP's wrapper, FSDP2's fully_shard),
`micro_batch` (DDP's no_sync before the last micro-batch), `reduce_gradients` (nothing left to
do after DDP's backward hooks), `clip_grad_norm` (over sharded gradients).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn


def init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA, gloo on the CPU. A no-op for a single process or when already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if spec == "bfloat16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


class Parallelism:
    """One process training alone (rank 0 of 1): the base every strategy overrides."""

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1) -> None:
        self.device = device
        self.rank = rank
        self.world = world

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train (the model itself here)."""
        return model

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """The context of one micro-batch's forward and backward; `last`: the step's final one,
        after which gradients are reduced."""
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        """Make every rank's .grad the mean over ranks."""

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor, in place, by its mean over ranks."""

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale the gradients to a total 2-norm of at most max_norm; the norm before, a scalar."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def barrier(self) -> None:
        """Wait for every rank."""


class AllReduce(Parallelism):
    """Several processes (torchrun), each with the whole model; gradients averaged by all_reduce."""

    def reduce_gradients(self, model: nn.Module) -> None:
        self.average([p.grad for p in model.parameters() if p.grad is not None])

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        # SUM then divide: gloo (CPU) has no AVG reduction.
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world)

    def barrier(self) -> None:
        dist.barrier()


def resolve_device(spec: str, world: int = 1) -> torch.device:
    """The device a config's spec names; "auto" is cuda (cuda:LOCAL_RANK under torchrun) when
    there is one, else the CPU."""
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0)
    return torch.device("cpu")


def make_parallelism(device: str) -> Parallelism:
    """The strategy for this process: AllReduce in a process group of several ranks, else one
    process. device: the config's spec (see resolve_device)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
        else (0, 1)
    resolved = resolve_device(device, world)
    return AllReduce(resolved, rank, world) if world > 1 else Parallelism(resolved, rank, world)
