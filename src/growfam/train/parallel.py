"""Processes, devices and gradient reduction: the one seam where several GPUs plug in.

`make_parallelism(device, options, dtype)` is called once per run and returns the strategy
the loop talks to; nothing else in train/ calls torch.distributed. The strategies
(TrainConfig.parallel.strategy):

- `Parallelism`: one process, rank 0 of a world of 1; every reduction is a no-op.
- `AllReduce` ("none" under torchrun): every rank holds the whole model; after a step's
  micro-batches the gradients are averaged over ranks, one tensor at a time.
- `DDP`: DistributedDataParallel, its bucketed all-reduce overlapped with the backward pass,
  none during gradient accumulation (no_sync before the last micro-batch).
- `FSDP`: FSDP2 (`fully_shard` on each transformer block, then the root, on a 1-D device
  mesh): parameters, gradients and AdamW moments sharded over the ranks; gradients clipped
  over the shards (its checkpoints, through torch.distributed.checkpoint, are
  train/checkpoint.py's). It runs in one
  process too (a group of one), so one GPU can train with FSDP2's mixed precision.

With several processes (or FSDP), rank 0's model — freshly seeded, handed to train(), or read
from a checkpoint — is the one every rank trains: the others build the same shape on the meta
device and receive rank 0's weights (and AdamW state) with `load_from_main`, so no rank but
rank 0 ever holds the whole model or optimizer state in memory.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from growfam.device import resolve_device
from growfam.errors import ConfigError, GrowfamError, TrainingDiverged
from growfam.train.config import ParallelConfig


#: How long the other ranks wait for what rank 0 does alone (data preparation, growth, a
#: member's evaluation, writing checkpoints): hours, where the collectives' own timeout is
#: minutes (NCCL's 10); bounded, so a rank 0 that died or hangs ends the job with an error.
MAIN_WAIT = datetime.timedelta(hours=24)

_host_groups: dict = {}  # the default group -> the gloo group share() and barrier() use with it
_opened: list = []  # the default groups this module opened (close_distributed leaves others alone)
_outcome = [False]  # whether the last command succeeded (record_outcome), for closing at exit


def init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA, gloo on the CPU; then open_host_group. A no-op for a single process or when already
    initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _own_default_group()
        open_host_group()


def close_distributed(succeeded: bool = True) -> None:
    """Leave the process group this module opened (init_distributed, make_parallelism), if any;
    one a caller opened is theirs to close. After a failure only a gloo group is closed: NCCL's
    teardown is collective and would hang on the ranks that did not fail."""
    if not (dist.is_available() and dist.is_initialized() and dist.group.WORLD in _opened):
        return
    if succeeded or dist.get_backend() == "gloo":
        _opened.clear()
        _host_groups.clear()
        dist.destroy_process_group()


def record_outcome(succeeded: bool) -> None:
    """Say whether the command now ending succeeded: at exit the group is closed accordingly
    (close_distributed). Without a word, it counts as failed."""
    _outcome[0] = succeeded


def _close_at_exit() -> None:
    close_distributed(_outcome[0])


def _own_default_group() -> None:
    """Remember the default group as opened here, and close it when the interpreter exits: gloo's
    worker threads still alive while the interpreter shuts down abort the process (SIGABRT after
    the work is done). At exit, not when a command ends: a process may run several commands in
    one group (a second init_process_group under torchrun reuses its store's keys and can hang)."""
    _opened.append(dist.group.WORLD)
    atexit.unregister(_close_at_exit)
    atexit.register(_close_at_exit)


def open_host_group(timeout: datetime.timedelta = MAIN_WAIT) -> None:
    """Give share() and barrier() a gloo group of all ranks whose timeout is `timeout`: they
    are where the other ranks wait for rank 0's work alone, which can outlast the default
    group's timeout. Collective: every rank calls it, right after joining the process group."""
    _host_groups.clear()  # a destroyed default group's
    _host_groups[dist.group.WORLD] = dist.new_group(backend="gloo", timeout=timeout)


def _host_group():
    """The host group opened with the current default group; None (the default group itself)
    when none was."""
    return _host_groups.get(dist.group.WORLD)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(obj: Any) -> Any:
    """Rank 0's `obj` (any picklable value) on every rank; `obj` itself in one process. The
    other ranks wait for rank 0 up to the host group's timeout (see open_host_group)."""
    if rank_and_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_host_group())
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process), up to the host group's timeout."""
    if rank_and_world()[1] > 1:
        dist.barrier(group=_host_group())


def on_main(work: Callable[[], Any]) -> Any:
    """work() on rank 0 alone, the others waiting for it (up to the host group's timeout); its
    result on rank 0, None on the others. When it fails, every rank raises: rank 0 its own
    exception, the others a GrowfamError of the same class and message (one line each, where
    they would otherwise wait for a rank 0 that stopped, or die in a collective)."""
    rank, world = rank_and_world()
    if world == 1:
        return work()
    result = failure = error = None
    if rank == 0:
        try:
            result = work()
        except BaseException as err:  # noqa: BLE001 -- re-raised below, after the others hear of it
            error = err
            failure = (type(err).__name__, str(err)) if isinstance(err, GrowfamError) else \
                ("GrowfamError", f"rank 0 stopped: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    failure = share(failure)
    if error is not None:
        raise error
    if failure is not None:
        kind = {cls.__name__: cls for cls in (GrowfamError, ConfigError, TrainingDiverged)}.get(failure[0], GrowfamError)
        raise kind(failure[1])
    return result


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (DTensor) tensor; any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if spec == "bfloat16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def checkpoint_blocks(model: nn.Module, every: int = 1) -> None:
    """Recompute the activations of every `every`-th transformer block (0, every-th, ...; 0:
    none) in the backward pass instead of keeping them. The block's forward is replaced in
    place, so parameter names do not change."""
    for i, block in enumerate(model.layers):
        if every and i % every == 0:
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on `device`: moved, or allocated there (uninitialised) when it is on meta."""
    if any(p.is_meta for p in model.parameters()):
        return model.to_empty(device=device)
    return model.to(device)


class Parallelism:
    """One process training alone (rank 0 of 1): the base every strategy overrides."""

    sharded = False  # parameters split over ranks: checkpoints go through DCP
    from_main = False  # the model is built on rank 0 and sent to the others (load_from_main)

    def __init__(self, device: torch.device, rank: int = 0, world: int = 1,
                 options: ParallelConfig | None = None, compute_dtype: torch.dtype | None = None) -> None:
        self.device = device
        self.rank = rank
        self.world = world
        self.options = options or ParallelConfig()
        self.compute_dtype = compute_dtype  # the run's autocast dtype (None: float32)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes checkpoints."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train, on this rank's device (allocated there when it is on meta), with
        activation checkpointing and per-block compilation as configured. The same object."""
        checkpoint_blocks(model, self.options.checkpoint_every)
        if self.options.compile:
            for block in model.layers:
                block.compile()
        return _on_device(model, self.device)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """A model that only runs forward (a distillation teacher): no gradients, eval mode, on
        this rank's device; whole on every rank (sharded like the trained model under FSDP)."""
        model.requires_grad_(False).eval()
        return _on_device(model, self.device)

    def loss_fn(self, model: nn.Module):
        """(idx, targets) [B, T] -> mean loss, through whatever wrapper reduces gradients; a
        `head=` keyword replaces the output head's cross-entropy (Llama.forward)."""
        return functools.partial(model.loss, loss_chunk=self.options.loss_chunk)

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

    def union(self, names: list[str]) -> list[str]:
        """Every rank's `names` together (the ranks of a sharded model see different tensors)."""
        return names

    def barrier(self) -> None:
        """Wait for every rank."""

    def load_from_main(self, model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict | None,
                       optimizer_state: dict | None = None) -> None:
        """Copy rank 0's whole `model_state` (and `optimizer_state`, keyed by parameter names:
        see named_optimizer_state) into every rank's `model` and `optimizer`, laid out as they
        are; the other ranks pass None. Collective."""
        with_moments = share(optimizer_state is not None)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, model_state if self.is_main else {}, options=options)
        if with_moments:
            set_optimizer_state_dict(model, optimizer, optimizer_state if self.is_main else {}, options=options)


class AllReduce(Parallelism):
    """Several processes (torchrun), each with the whole model; gradients averaged by all_reduce,
    one tensor at a time after the backward pass (strategy "none"; the baseline DDP beats)."""

    from_main = True

    def reduce_gradients(self, model: nn.Module) -> None:
        self.average([p.grad for p in model.parameters() if p.grad is not None])

    def average(self, tensors: Sequence[torch.Tensor]) -> None:
        # SUM then divide: gloo (CPU) has no AVG reduction.
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(self.world)

    def barrier(self) -> None:
        barrier()


class _Loss(nn.Module):
    """model.loss as a module's forward: DDP must be called to reduce the gradients."""

    def __init__(self, model: nn.Module, loss_chunk: int) -> None:
        super().__init__()
        self.model = model
        self.loss_chunk = loss_chunk

    def forward(self, idx: torch.Tensor, targets: torch.Tensor, head=None) -> torch.Tensor:
        return self.model.loss(idx, targets, self.loss_chunk, head)


class DDP(AllReduce):
    """DistributedDataParallel: gradients averaged in buckets while the backward pass runs."""

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = super().wrap(model)
        # gradient_as_bucket_view: the gradients live in DDP's buckets (no copy in and out)
        self.ddp = DistributedDataParallel(_Loss(model, self.options.loss_chunk), device_ids=[self.device] if self.device.type == "cuda"
                                           else None, gradient_as_bucket_view=True)
        return model

    def loss_fn(self, model: nn.Module):
        return self.ddp

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.ddp.no_sync()

    def reduce_gradients(self, model: nn.Module) -> None:
        pass  # done by DDP's hooks during the last micro-batch's backward


class FSDP(AllReduce):
    """FSDP2: fully_shard on each transformer block, then on the root, over all ranks (a 1-D
    mesh), or HSDP with parallel.replicate: sharded within groups, replicated across them."""

    sharded = True

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        replicas = self.options.replicate
        self.mesh = init_device_mesh(self.device.type, (replicas, self.world // replicas),
                                     mesh_dim_names=("replicate", "shard")) if replicas > 1 else \
            init_device_mesh(self.device.type, (self.world,))
        mixed = self.options.mixed_precision
        bf16 = mixed == "bf16" or (mixed == "auto" and self.compute_dtype == torch.bfloat16)
        self.policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        checkpoint_blocks(model, self.options.checkpoint_every)
        for block in model.layers:
            if self.options.compile:
                block.compile()
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy,
                        reshard_after_forward=self.options.reshard_after_forward)
        # The root (embedding, final norm, head) is gathered for the whole step: the head is
        # needed right after the forward pass ends.
        fully_shard(model, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=False)
        return _on_device(model, self.device)

    def wrap_frozen(self, model: nn.Module) -> nn.Module:
        """Each block sharded as the trained model's are (call after wrap); the embedding, final
        norm and head stay whole on every rank, where the distillation loss reads the head."""
        from torch.distributed.fsdp import fully_shard

        model.requires_grad_(False).eval()
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy, reshard_after_forward=True)
        return _on_device(model, self.device)

    def micro_batch(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        if self.options.replicate > 1:
            # HSDP: each micro-batch's gradients are reduce-scattered within the shard group and
            # summed into the shards; the all-reduce across replicas (between nodes) waits for
            # the last micro-batch and carries the sum once per step.
            model.set_requires_all_reduce(last)
        return contextlib.nullcontext()

    def reduce_gradients(self, model: nn.Module) -> None:
        pass  # reduce-scattered by FSDP during each backward pass

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        return super().clip_grad_norm(model, max_norm).full_tensor()

    def union(self, names: list[str]) -> list[str]:
        every = [None] * self.world
        dist.all_gather_object(every, names)
        return sorted(set().union(*every))

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on the CPU on rank 0 (None on the others); collective."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if self.is_main else None


def make_parallelism(device: str, options: ParallelConfig | None = None, dtype: str = "auto") -> Parallelism:
    """The strategy for this process. device, dtype: the config's specs (see resolve_device,
    amp_dtype); options: its `parallel` section. FSDP in a single process runs in a process
    group of one."""
    options = options or ParallelConfig()
    rank, world = rank_and_world()
    resolved = resolve_device(device, world)
    strategy = options.resolved(world)
    if strategy == "none" and world == 1:
        return Parallelism(resolved, rank, world, options, amp_dtype(dtype, resolved))
    if world == 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        _own_default_group()
    kind = {"none": AllReduce, "ddp": DDP, "fsdp": FSDP}[strategy]
    return kind(resolved, rank, world, options, amp_dtype(dtype, resolved))
