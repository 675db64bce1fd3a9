"""Training one model: the config, the optimizer, the spike guard, checkpoints, logging, the loop.

- `config`: TrainConfig (validated, YAML/dict in and out; tokens_per_step, total_steps) and
  its `parallel:` section (ParallelConfig), the training defaults written once
  (DEFAULT_MAX_LR, DEFAULT_MIN_LR_RATIO), a family's peak-LR policy (LRPolicy, the YAML's
  `lr:` section), steps_for, check_seq_len, RESUME_FREE_KEYS and check_resumable (what a
  resumed run may change).
- `distill`: the `distill:` section (DistillConfig: teacher, weight α, temperature, kind,
  until/ramp, top_k) and the distillation loss taken chunk by chunk through both heads
  (distill_loss, divergence).
- `teacher`: Teacher (a frozen teacher laid out like the student, the loss function of a
  distillation step, its FLOPs) and check_teacher (before any work).
- `optim`: the LR schedule (lr_at, lr_bounds), AdamW's param groups, make_optimizer,
  apply_hyperparameters, check_optimizer.
- `guard`: SpikeGuard, the loss-spike guard (skip, roll back, or stop as diverged), and
  nonfinite_tensors (the weights and moments it checks).
- `parallel`: Parallelism, the one interface to processes, devices and gradient reduction
  (one process; under torchrun AllReduce, DDP or FSDP2), make_parallelism, init_distributed,
  amp_dtype, share/barrier/on_main.
- `checkpoint`: complete, atomic checkpoints (Hugging Face directories plus optimizer and
  trainer state; the sharded state of FSDP runs through torch.distributed.checkpoint),
  latest_checkpoint, load/save in any layout: the run's checkpointer, as parallel is its
  parallelism.
- `metrics`: MetricsLogger (metrics.jsonl, TensorBoard, wandb), read_metrics, peak_flops.
- `state`: what the loop and its callbacks share: Schedule, RunState (step, losses, ledger),
  Run (the run's parts), encode_rng/decode_rng (the generators' state in trainer_state.json).
- `callbacks`: Callback (the hooks) and the built-in ones: MaskRamp (masked-growth ramp),
  Progress (train log line, progress bar), Validation (evaluate, on_eval), Checkpoints.
- `setup`: before the loop: check_inputs, build_run (the model laid out by the Parallelism,
  rank 0's state sent to the other ranks), resume_run, check_vocabulary,
  validation_tokens.
- `loop`: train() and TrainResult, forward_backward; the step, the spike guard's rollbacks;
  validation_loss (train()'s validation of a model as it is).

Imports point one way: config imports distill; optim and parallel import config; teacher
imports distill, config and parallel; guard imports parallel; checkpoint
imports guard and parallel; state imports config, guard, metrics and parallel; callbacks
imports state, checkpoint, config, metrics, optim and parallel; setup imports all of these and teacher;
loop imports setup and what it uses; distill and metrics import nothing of train/. train/ may
import the top-level helpers, model, data and grow; nothing of growfam.config (which imports
train.config), family/ or the CLI.
"""

from growfam.train.callbacks import Callback, Checkpoints, MaskRamp, Progress, Validation, evaluate
from growfam.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    read_trainer_state,
    save_checkpoint,
)
from growfam.train.config import (
    STRATEGIES,
    DEFAULT_MAX_LR,
    DEFAULT_MIN_LR_RATIO,
    RESUME_FREE_KEYS,
    ParallelConfig,
    TrainConfig,
    check_resumable,
    check_seq_len,
    steps_for,
)
from growfam.train.distill import KINDS, DistillConfig, distill_loss, divergence
from growfam.train.guard import SPIKE_EMA_BETA, SpikeGuard
from growfam.train.loop import TrainResult, forward_backward, train, validation_loss
from growfam.train.metrics import MetricsLogger, peak_flops, read_metrics
from growfam.train.optim import (
    apply_hyperparameters,
    check_optimizer,
    lr_at,
    lr_bounds,
    make_optimizer,
    param_groups,
)
from growfam.train.parallel import DDP, FSDP, AllReduce, Parallelism, init_distributed, make_parallelism
from growfam.train.state import Run, RunState, Schedule
from growfam.train.teacher import Teacher, check_teacher

__all__ = [
    "DEFAULT_MAX_LR",
    "DEFAULT_MIN_LR_RATIO",
    "RESUME_FREE_KEYS",
    "SPIKE_EMA_BETA",
    "STRATEGIES",
    "DDP",
    "KINDS",
    "DistillConfig",
    "Teacher",
    "check_teacher",
    "distill_loss",
    "divergence",
    "FSDP",
    "AllReduce",
    "Callback",
    "Checkpoints",
    "MaskRamp",
    "MetricsLogger",
    "ParallelConfig",
    "Parallelism",
    "Progress",
    "Run",
    "RunState",
    "Schedule",
    "SpikeGuard",
    "TrainConfig",
    "TrainResult",
    "Validation",
    "apply_hyperparameters",
    "check_optimizer",
    "check_resumable",
    "check_seq_len",
    "evaluate",
    "forward_backward",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "load_optimizer_state",
    "lr_at",
    "lr_bounds",
    "make_optimizer",
    "make_parallelism",
    "param_groups",
    "peak_flops",
    "read_metrics",
    "read_trainer_state",
    "save_checkpoint",
    "steps_for",
    "train",
    "validation_loss",
]
