"""What the training loop and its callbacks share: the step plan, the run's progress, its parts.

- `Schedule`: how many optimizer steps a run takes and how each splits into micro-batches.
- `RunState`: the progress that checkpoints carry (step, losses, FLOPs ledger, the losses of
  the open logging window) and the values of the last optimizer step.
- `Run`: one run's parts (config, parallelism, model, optimizer, data, guard, logger,
  callbacks), built once by `train()` and handed to every callback hook.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from growfam.data import MixedWindows, PackedWindows
from growfam.errors import ConfigError
from growfam.model import Llama
from growfam.train.config import TrainConfig
from growfam.train.guard import SpikeGuard
from growfam.train.metrics import MetricsLogger
from growfam.train.parallel import Parallelism

if TYPE_CHECKING:
    from growfam.train.callbacks import Callback
    from growfam.train.teacher import Teacher


@dataclass(frozen=True)
class Schedule:
    """The run's length and the shape of one optimizer step, for `world` ranks."""

    micro_batch: int  # sequences per forward/backward on one rank
    accum: int  # micro-batches per optimizer step on one rank
    tokens_per_step: int  # targets per optimizer step, all ranks together
    total_steps: int
    warmup_steps: int
    decay_steps: int = 0  # WSD's decay at the end of the run (0 for cosine and constant)

    @classmethod
    def of(cls, cfg: TrainConfig, world: int) -> Schedule:
        """ConfigError when batch_size does not split into whole micro-batches on every rank."""
        per_rank, rem = divmod(cfg.batch_size, world)
        micro = cfg.micro_batch_size or per_rank
        if rem or per_rank % micro:
            raise ConfigError(f"batch_size {cfg.batch_size} must split into {world} rank(s) × whole "
                              f"micro-batches of {micro} sequences")
        total_steps = cfg.total_steps
        decay = math.ceil(cfg.decay_frac * total_steps) if cfg.lr_schedule == "wsd" else 0
        return cls(micro, per_rank // micro, cfg.tokens_per_step, total_steps,
                   math.ceil(cfg.warmup_frac * total_steps), decay)

    @property
    def stable_end(self) -> int:
        """Optimizer steps before WSD's decay begins (the stable checkpoint's step); the run's
        length without one."""
        return max(self.total_steps - self.decay_steps, self.warmup_steps) if self.decay_steps else self.total_steps


def empty_ledger() -> dict[str, int | float]:
    """A run's ledger before its first step (also the keys a checkpoint of an older version lacks)."""
    return {"tokens_processed": 0, "flops": 0, "flops_attn": 0, "flops_teacher": 0, "flops_teacher_attn": 0,
            "wall_s": 0.0}


@dataclass
class RunState:
    """A run's progress. Losses in nats per token; the ledger counts every step taken (rolled
    back ones too): tokens, FLOPs (6·N·D and attention-inclusive; a distillation teacher's
    forward passes apart, 2·N_t·D and attention-inclusive) and wall seconds over every session
    of a resumed run."""

    step: int = 0  # optimizer steps done
    train_loss: float | None = None  # mean over the last logging window
    val_loss: float | None = None
    ledger: dict[str, int | float] = field(default_factory=empty_ledger)
    window_losses: list[float] = field(default_factory=list)  # accepted losses since the last `train` log line
    # with a teacher: the accepted steps' parts of the loss since then ("ce", and "kl" where α > 0)
    window_parts: dict[str, list[float]] = field(default_factory=dict)
    stopped_early: bool = False  # a callback ended the run before its last step
    # the last optimizer step (not saved)
    lr: float = 0.0
    loss: float = math.nan
    parts: dict[str, float] = field(default_factory=dict)  # with a teacher: its "ce" and "kl"
    alpha: float = 0.0  # the distillation weight α
    grad_norm: float = math.nan
    verdict: str = "ok"  # the spike guard's: "ok" (update applied), "skip", "rollback", "diverged"
    seconds: float = 0.0  # its forward, backward and update

    def count_step(self, tokens: int, nonembedding_params: int, attn_flops_per_token: int, wall_s: float,
                   teacher_flops_per_token: tuple[int, int] = (0, 0)) -> None:
        """One more optimizer step of `tokens` targets; teacher_flops_per_token: its forward's
        (2·N_t, attention-inclusive) when a teacher ran."""
        self.step += 1
        self.ledger["tokens_processed"] += tokens
        self.ledger["flops"] += 6 * nonembedding_params * tokens
        self.ledger["flops_attn"] += attn_flops_per_token * tokens
        self.ledger["flops_teacher"] += teacher_flops_per_token[0] * tokens
        self.ledger["flops_teacher_attn"] += teacher_flops_per_token[1] * tokens
        self.ledger["wall_s"] = wall_s

    def accept(self) -> None:
        """The last step stands: its loss (and parts) join the logging window."""
        self.window_losses.append(self.loss)
        for name, value in self.parts.items():
            self.window_parts.setdefault(name, []).append(value)


@dataclass
class Run:
    """One run's parts, built by train() before its first step; every callback hook gets it."""

    cfg: TrainConfig  # with `model` filled in
    schedule: Schedule
    parallel: Parallelism
    model: Llama  # what is trained (parallel.wrap of the model)
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (idx, targets) [B, T] -> mean loss
    amp_dtype: torch.dtype | None  # autocast dtype, None for float32
    windows: PackedWindows | MixedWindows  # this rank's training batches
    val_tokens: np.ndarray | None  # None: no validation window fits
    guard: SpikeGuard
    tokenizer: Any  # saved into every checkpoint, or None
    run_config: dict[str, Any]  # cfg as JSON, recorded in checkpoints and compared on resume
    nonembedding_params: int
    attn_flops_per_token: int  # model.flops_per_token at seq_len
    teacher: Teacher | None = None  # the distillation teacher, if any
    callbacks: list[Callback] = field(default_factory=list)
    state: RunState = field(default_factory=RunState)
    log: MetricsLogger | None = None  # opened once the run is known not to be finished already

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.out_dir)


def encode_rng() -> dict[str, Any]:
    """torch's CPU (and CUDA) generator states as base64 strings, so JSON can hold them."""
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def decode_rng(state: dict[str, Any]) -> None:
    """Restore what encode_rng saved (the CUDA part only when CUDA is here)."""
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
