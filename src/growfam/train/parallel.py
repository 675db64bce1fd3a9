"""Processes and devices: the one place that knows about ranks (torchrun) and reduces over them.

A single process is rank 0 of a world of 1, and every function here is then a no-op or the
trivial answer; nothing else in train/ calls torch.distributed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA, gloo on the CPU. A no-op for a single process or when already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(spec: str, world: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0)
    return torch.device("cpu")


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if spec == "bfloat16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def average_over_ranks(tensors: Sequence[torch.Tensor], world: int) -> None:
    # SUM then divide: gloo (CPU) has no AVG reduction.
    if world > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()
