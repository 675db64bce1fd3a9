"""The training loop: one stage of a family, read top to bottom (nanoGPT style).

`train(cfg)` trains a fresh model; `train(cfg, model, optimizer)` continues a grown one (its
AdamW state is kept, its learning rate follows this stage's schedule). Each optimizer step:

1. set the learning rate from the cosine schedule (`lr_at`),
2. forward/backward over `batch_size / (micro_batch_size · world_size)` micro-batches
   (gradient accumulation), bf16 autocast on GPU, fp32 on CPU,
3. clip the gradient norm, ask the spike guard whether to apply the update (NaN/inf, or a loss
   above `spike_factor` × a baseline that starts at ln(vocab_size) and then is the lowest
   running mean reached, is skipped; repeated spikes roll back to the last checkpoint with a
   lower peak LR), step AdamW, advance masked-growth ramps,
4. every `log_every` / `eval_every` / `ckpt_every` steps: log, validate, checkpoint (the last
   only after an accepted step, and never with NaN/inf in the weights or AdamW moments: such
   an update is rolled back instead).

What a run guarantees: every input is checked before any work or write (one GrowfamError);
rollbacks are bounded — `max_rollbacks` in a row that do not get past the spikes, or NaN/inf
weights with no checkpoint to return to, stop the run with `TrainingDiverged` (CLI exit 3),
logged as a "diverged" event, keeping the last checkpoint; a killed run resumes bit-for-bit,
logged train losses included; a damaged checkpoint is named with the one to fall back to; a
full disk is one GrowfamError and the checkpoints written before stay intact.

Units: steps are optimizer steps; tokens count targets (batch_size · seq_len per step, all ranks
together); learning rates are per step; losses are mean cross-entropy in nats per token; FLOPs
are floating-point operations (6·N·D with non-embedding N, and the attention-inclusive count of
`model.flops_per_token`).

Multi-process (torchrun): data is sharded by rank, the gradient and the loss are averaged over
ranks, only rank 0 logs and writes checkpoints, and checkpoints are whole Hugging Face
directories a single process can read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from growfam.checkpoint import (STATE_FILE, broken_checkpoint, checkpoint_root, decode_rng, encode_rng,
                                latest_checkpoint, load_checkpoint, nonfinite_tensors, read_trainer_state,
                                save_checkpoint)
from growfam.data import PackedWindows, TokenDataset, eval_windows
from growfam.errors import ConfigError, GrowfamError, TrainingDiverged, as_int, as_number, check_keys, read_yaml
from growfam.grow.masks import MaskState, advance_masks, attach_masks, fold_masks, mask_state
from growfam.io import remove_stale_temporaries
from growfam.metrics import MetricsLogger, peak_flops
from growfam.model import Llama, ModelConfig, flops_per_token, num_params, resolve_config

Batch = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """One training run. Loaded from YAML with `TrainConfig.load`; unknown keys are errors.

    model: a ModelConfig, preset name, config path or dict; None when `train` is handed a model.
    data: a prepared token dataset directory (`growfam data prepare`).
    out_dir: where metrics.jsonl, tensorboard/ and checkpoints/ go.
    max_steps / max_tokens: the length of the run, exactly one of them (tokens are rounded up
        to whole steps).
    batch_size: global batch in sequences per optimizer step (all ranks together).
    micro_batch_size: sequences per forward pass per rank; None = batch_size / world_size (no
        gradient accumulation). Must divide the per-rank batch.
    seq_len: tokens per training sequence.
    max_lr: peak learning rate. min_lr: absolute floor of the cosine, or min_lr_ratio: floor as
        a fraction of max_lr (at most one of the two; default ratio 0.1).
    warmup_frac: fraction of the steps spent warming up linearly (rounded up to whole steps).
    betas, eps, weight_decay: AdamW (each beta in [0, 1)). Weight decay applies to tensors with
        ndim >= 2 (every linear weight and the embedding, as in nanoGPT and the paper's single
        "0.1"), never to the RMSNorm gains. They are also set on an optimizer handed to `train`
        (whose state may carry another stage's values), so what a checkpoint records is applied.
    grad_clip: max global gradient L2 norm; 0 disables clipping (the norm is still logged).
    seed: model initialisation and data order.
    device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:N" or "mps"; checked
        against this machine when the config is made.
    dtype: "auto" (bfloat16 autocast on CUDA, float32 elsewhere), "bfloat16" or "float32".
        Master weights and optimizer state are always float32.
    compile: torch.compile the loss function.
    eval_every: validate every N steps (0: only at the end); eval_batches: micro-batches of
        validation windows per evaluation.
    ckpt_every: checkpoint every N steps (0: only at the end); keep_last: checkpoints kept (0: all).
    log_every: log the mean training loss every N steps.
    spike_factor: a loss above spike_factor × the guard's baseline skips the update (None: only
        NaN/inf do). The baseline is ln(vocab_size) (a uniform predictor's loss) at step 0 and
        then the lowest running mean of accepted losses, so the guard is armed from the first
        step and a blow-up cannot drag it along. spike_patience spikes within spike_window steps
        roll back to the last checkpoint and multiply the max LR by spike_lr_factor (patience 0:
        never roll back).
    max_rollbacks: the most rollbacks in a row that do not get the run past the step where the
        previous one happened; one more stops the run with TrainingDiverged (CLI exit 3),
        keeping the last good checkpoint. So does NaN/inf in the weights with no checkpoint to
        go back to.
    max_unique_tokens: fixed-data mode (paper Table 2): train on the first N tokens only and
        repeat them once consumed.
    tensorboard: also write TensorBoard logs (when tensorboard is installed).
    wandb_project: log to this Weights & Biases project (needs wandb installed).
    """

    model: ModelConfig | None = None
    data: str | None = None
    out_dir: str = "runs/train"
    max_steps: int | None = None
    max_tokens: int | None = None
    batch_size: int = 32
    micro_batch_size: int | None = None
    seq_len: int = 256
    max_lr: float = 3e-4
    min_lr: float | None = None
    min_lr_ratio: float | None = None
    warmup_frac: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    eval_every: int = 200
    eval_batches: int = 20
    ckpt_every: int = 1000
    keep_last: int = 2
    log_every: int = 10
    spike_factor: float | None = 2.0
    spike_patience: int = 3
    spike_window: int = 100
    spike_lr_factor: float = 0.5
    max_rollbacks: int = 3
    max_unique_tokens: int | None = None
    tensorboard: bool = True
    wandb_project: str | None = None

    def __post_init__(self) -> None:
        if self.model is not None:
            self.model = resolve_config(self.model)
        for name, low in (("batch_size", 1), ("seq_len", 1), ("eval_batches", 1), ("log_every", 1),
                          ("spike_window", 1), ("seed", 0), ("eval_every", 0), ("ckpt_every", 0),
                          ("keep_last", 0), ("spike_patience", 0), ("max_rollbacks", 0)):
            setattr(self, name, as_int(getattr(self, name), name, low))
        for name in ("max_steps", "max_tokens", "micro_batch_size", "max_unique_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, as_int(getattr(self, name), name, 1))
        for name, low, high in (("max_lr", 0, None), ("warmup_frac", 0, 1), ("eps", 0, None),
                                ("weight_decay", 0, None), ("grad_clip", 0, None),
                                ("spike_lr_factor", 0, 1)):
            setattr(self, name, _float(getattr(self, name), name, low, high))
        for name, low, high in (("min_lr", 0, None), ("min_lr_ratio", 0, 1), ("spike_factor", 1, None)):
            if getattr(self, name) is not None:
                setattr(self, name, _float(getattr(self, name), name, low, high))
        if not isinstance(self.betas, (list, tuple)) or len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers, got {self.betas!r}")
        self.betas = tuple(as_number(b, "betas") for b in self.betas)
        for b in self.betas:  # beta = 1 never forgets the first gradient: Adam stops learning
            if not 0 <= b < 1:
                raise ConfigError(f"betas must each be in [0, 1), got {b}")
        check_device(self.device)
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ConfigError("give exactly one of max_steps and max_tokens")
        if self.min_lr is not None and self.min_lr_ratio is not None:
            raise ConfigError("give at most one of min_lr (absolute) and min_lr_ratio")
        if self.min_lr is not None and self.min_lr > self.max_lr:
            raise ConfigError(f"min_lr {self.min_lr} is above max_lr {self.max_lr}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name in ("compile", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.model is not None and self.seq_len > self.model.max_seq_len:
            raise ConfigError(f"seq_len {self.seq_len} exceeds the model's max_seq_len {self.model.max_seq_len}")

    # ---- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a train config must be a mapping, got {type(data).__name__}")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "the train config")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(read_yaml(path))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the model as a dict, betas as a list."""
        out = dataclasses.asdict(self)
        out["betas"] = list(self.betas)
        return out

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _float(value: Any, name: str, low: float, high: float | None) -> float:
    return as_number(value, name, at_least=low, at_most=high)


def check_device(spec: Any) -> None:
    """ConfigError unless `spec` is "auto" or a device this machine has (cpu, cuda[:N], mps)."""
    if spec == "auto":
        return
    try:
        device = torch.device(spec) if isinstance(spec, str) else None
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r}: CUDA is not available on this machine; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r}: MPS is not available on this machine; use cpu or auto")


#: Config keys that may change between a checkpoint and its resumption: they steer logging,
#: bookkeeping and hardware, not the loss trajectory.
RESUME_FREE_KEYS = frozenset({
    "out_dir", "data", "device", "compile", "micro_batch_size", "eval_every", "eval_batches",
    "ckpt_every", "keep_last", "log_every", "tensorboard", "wandb_project", "max_rollbacks",
})


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """ConfigError naming every trajectory-relevant key that differs from the checkpoint's."""
    differ = [k for k in sorted(set(saved) | set(current))
              if k not in RESUME_FREE_KEYS and saved.get(k) != current.get(k)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {current.get(k)!r}" for k in differ)
        raise ConfigError(f"the config does not match the checkpoint {where} ({lines}); "
                          "use the original config, or a new out_dir to start over")


# --------------------------------------------------------------------------------------------
# Schedule and optimizer
# --------------------------------------------------------------------------------------------


def lr_at(step: int, total_steps: int, max_lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over `warmup_steps` (step 0 already gets max_lr / warmup_steps, never 0),
    then a cosine from max_lr down to min_lr, reached exactly at the last step; min_lr after.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


#: The cosine floor as a fraction of the peak when the config gives neither min_lr nor
#: min_lr_ratio (Llama's convention; the paper states none).
DEFAULT_MIN_LR_RATIO = 0.1


def lr_bounds(cfg: TrainConfig, scale: float = 1.0) -> tuple[float, float]:
    """(max_lr, min_lr) of the schedule with the peak multiplied by `scale` (the spike guard's
    rollbacks lower it); a ratio floor scales with it, an absolute one is capped by it."""
    max_lr = cfg.max_lr * scale
    if cfg.min_lr is not None:
        return max_lr, min(cfg.min_lr, max_lr)
    ratio = DEFAULT_MIN_LR_RATIO if cfg.min_lr_ratio is None else cfg.min_lr_ratio
    return max_lr, ratio * max_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on tensors with ndim >= 2 (matrices, embeddings), not on gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay"},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused kernels where torch has them (CUDA and CPU)."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.max_lr, betas=cfg.betas,
                             eps=cfg.eps, fused=fused)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set cfg's betas, eps and weight decay on every param group (decay only on the "decay"
    group, or on an unnamed group of matrices). load_state_dict replaces the groups' values
    with the saved ones, so this runs after every load. ConfigError for an unnamed group that
    mixes matrices and gains: weight decay cannot apply as configured."""
    for group in optimizer.param_groups:
        matrices = {p.ndim >= 2 for p in group["params"]}
        if "name" not in group and len(matrices) > 1:
            raise ConfigError("the optimizer has a param group mixing matrices and norm gains; build it with "
                              "growfam.train.make_optimizer (or param_groups) so weight decay skips the gains")
        decays = group["name"] == "decay" if "name" in group else matrices == {True}
        group.update(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay if decays else 0.0)


# --------------------------------------------------------------------------------------------
# Loss-spike guard (paper section 4.4 and Appendix C)
# --------------------------------------------------------------------------------------------

#: The running mean is an EMA of accepted losses with this beta (about the last 10 steps).
SPIKE_EMA_BETA = 0.9


@dataclass
class SpikeGuard:
    """Decides for each optimizer step whether its update is applied.

    A step is a spike when its loss or gradient norm is NaN/inf or its loss exceeds `factor` ×
    the baseline. The baseline starts at `baseline` (train() gives ln(vocab_size)) and then is
    the lowest running mean of accepted losses reached so far. Why: an EMA of accepted losses
    follows a blow-up that rises less than `factor` per step (8 -> 3000 went through unflagged),
    while the lowest mean reached cannot rise; and a freshly initialised model predicts about
    uniformly, so ln(V) bounds a sane starting loss and arms the guard from step 0.

    A spike's update is skipped. `patience` spikes within `window` steps ask for a rollback:
    the peak LR scale drops by `lr_factor`. The rollback after `max_rollbacks` rollbacks in a
    row (none of which the run got past: accepted the step it happened at) is refused:
    "diverged".
    """

    factor: float | None = 2.0
    patience: int = 3
    window: int = 100
    lr_factor: float = 0.5
    max_rollbacks: int = 3
    # state, saved in checkpoints
    baseline: float | None = None
    mean: float | None = None
    accepted: int = 0
    recent: list[int] = field(default_factory=list)
    lr_scale: float = 1.0
    spikes: int = 0
    rollbacks: int = 0
    streak: int = 0  # rollbacks in a row without accepting step `rolled_back_at` or a later one
    rolled_back_at: int = -1  # the furthest step (0-based) a rollback of the streak happened at

    STATE = ("baseline", "mean", "accepted", "recent", "lr_scale", "spikes", "rollbacks", "streak",
             "rolled_back_at")

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        """"ok" (apply the update), "skip", "rollback" (skip and reload the last checkpoint) or
        "diverged" (stop the run). `step` is the 0-based index of the step."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite and not (self.factor is not None and self.baseline is not None
                           and loss > self.factor * self.baseline):
            self.mean = loss if self.mean is None else SPIKE_EMA_BETA * self.mean + (1 - SPIKE_EMA_BETA) * loss
            self.baseline = self.mean if self.baseline is None else min(self.baseline, self.mean)
            self.accepted += 1
            if step >= self.rolled_back_at:
                self.streak = 0
            return "ok"
        self.spikes += 1
        self.recent = [s for s in self.recent if s > step - self.window] + [step]
        if self.patience and len(self.recent) >= self.patience:
            return self.rollback(step)
        return "skip"

    def rollback(self, step: int) -> str:
        """Ask to go back to the last checkpoint from step `step`: "rollback" (the LR scale
        drops) or, once `max_rollbacks` in a row did not get the run past them, "diverged"."""
        self.recent = []
        if self.streak >= self.max_rollbacks:
            return "diverged"
        self.streak += 1
        self.rolled_back_at = max(self.rolled_back_at, step)
        self.lr_scale *= self.lr_factor
        self.rollbacks += 1
        return "rollback"

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; keys it lacks (older checkpoints) keep their values here.
        TypeError for a value of the wrong kind, so a damaged checkpoint fails here, not later."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for k in self.STATE:
            value = state.get(k, getattr(self, k))
            if k == "recent":
                ok = isinstance(value, list) and all(type(s) is int for s in value)
            elif k in ("baseline", "mean", "lr_scale"):
                ok = number(value) or (value is None and k != "lr_scale")
            else:
                ok = type(value) is int
            if not ok:
                raise TypeError(f"spike guard {k} is {value!r}")
            setattr(self, k, value)


# --------------------------------------------------------------------------------------------
# One step's forward and backward
# --------------------------------------------------------------------------------------------


def forward_backward(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     batches: Sequence[Batch], device: torch.device,
                     amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Accumulate into .grad the gradient of the mean loss over equal-sized micro-batches.

    Returns that mean loss (detached, on `device`). Each micro-batch's loss is divided by their
    number before backward, so k micro-batches of b sequences give the gradient of one batch
    of k·b sequences.
    """
    total = torch.zeros((), device=device)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(x, y)
        (loss / len(batches)).backward()
        total += loss.detach().float()
    return total / len(batches)


# --------------------------------------------------------------------------------------------
# Result and small helpers
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What a run produced. Losses in nats per token; FLOPs counted over every step taken
    (including steps later rolled back); wall_s over every session of a resumed run."""

    train_loss: float | None  # mean over the last logging window
    val_loss: float | None
    steps: int
    tokens: int  # steps × batch_size × seq_len
    flops: int  # 6 · N_nonembedding · tokens processed
    flops_attn: int  # model.flops_per_token(seq_len) · tokens processed
    wall_s: float
    hf_dir: Path  # the final checkpoint, a Hugging Face directory
    spikes: int = 0
    rollbacks: int = 0
    stopped_early: bool = False


def init_distributed() -> None:
    """Join the process group torchrun describes (WORLD_SIZE > 1 in the environment): NCCL on
    CUDA, gloo on the CPU. A no-op for a single process or when already initialised."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(spec: str, world: int) -> torch.device:
    if spec != "auto":
        return torch.device(spec)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else 0)
    return torch.device("cpu")


def _amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain float32."""
    if spec == "bfloat16" or (spec == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def _average_over_ranks(tensors: Sequence[torch.Tensor], world: int) -> None:
    # SUM then divide: gloo (CPU) has no AVG reduction.
    if world > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t.div_(world)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


@torch.no_grad()
def evaluate(loss_fn: Callable, val_tokens, cfg: TrainConfig, batch_size: int, device: torch.device,
             amp_dtype: torch.dtype | None, rank: int = 0, world: int = 1) -> float:
    """Mean validation loss over `eval_batches` batches of fixed, evenly spread windows."""
    total = torch.zeros(2, device=device)  # sum of losses × windows, windows
    batches = eval_windows(val_tokens, cfg.seq_len, cfg.eval_batches * batch_size, batch_size)
    for i, (x, y) in enumerate(batches):
        if i % world != rank:
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(x.to(device), y.to(device)).float()
        total += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=device)])
    _average_over_ranks([total], world)
    return (total[0] / total[1]).item()


def _check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ConfigError(f"the optimizer does not hold the model's parameters {', '.join(missing[:3])}"
                          f"{' …' if len(missing) > 3 else ''}; build it from this model")


def _masks_to_dict(model: Llama) -> dict[str, Any] | None:
    """The masked-growth ramp position (None without masks): masks are buffers outside the
    state dict, so checkpoints carry them here."""
    state = mask_state(model)
    return None if state is None else dataclasses.asdict(state)


def _masks_from_dict(model: Llama, saved: dict[str, Any] | None) -> None:
    fold_masks(model)  # drop whatever ramp the model is on now
    if saved is not None:
        attach_masks(model, MaskState(**saved))


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, model: Llama | None = None, optimizer: torch.optim.Optimizer | None = None,
          *, tokenizer=None, on_eval: Callable[[int, float], bool | None] | None = None,
          dataset=None, resume: bool | None = None) -> TrainResult:
    """Train one stage; returns its TrainResult. See the module docstring for the step.

    model / optimizer: start from these (a grown model and its transferred AdamW state)
        instead of a fresh, seeded initialisation; the optimizer's LR follows the schedule,
        and its betas, eps and weight decay are set from cfg.
    tokenizer: saved into every checkpoint (default: the dataset's tokenizer).
    on_eval(step, val_loss): called after each validation; returning True stops the run there
        (with a final checkpoint), e.g. when the loss has converged.
    dataset: an object with `.tokens("train" | "val")` (1-D token arrays) and `.vocab_size`,
        used instead of opening `cfg.data`.
    resume: None resumes when out_dir holds a checkpoint; True requires one; False requires
        none (it never silently continues, nor overwrites, an earlier run).

    Guaranteed: the config, model, data, out_dir and the checkpoint to resume are checked
    before any work or write (a GrowfamError, one line). A killed and resumed run trains and
    logs bit-for-bit what the uninterrupted run would. No checkpoint holds NaN/inf; rollbacks
    are bounded, and a run that keeps diverging stops with TrainingDiverged, logged to
    metrics.jsonl, keeping its last good checkpoint. A damaged checkpoint is named along with
    the one to fall back to. A full disk is a GrowfamError that leaves earlier checkpoints
    intact. Temporaries of killed checkpoint writes are removed at the start.
    """
    rank, world = _rank_world()
    device = _resolve_device(cfg.device, world)
    amp_dtype = _amp_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_dir)

    # ---- check every input before any work or write -------------------------------------------
    _check_out_dir(out_dir)
    if model is None and cfg.model is None:
        raise ConfigError("no model: set `model` in the train config or pass one to train()")
    if model is not None and cfg.model is not None and _shape(cfg.model) != _shape(model.cfg):
        raise ConfigError(f"the model handed to train() is not the configured one: {model.cfg} vs {cfg.model}")
    if cfg.model is None:
        cfg = cfg.replace(model=model.cfg)
    if cfg.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len {cfg.model.max_seq_len}")
    per_rank, rem = divmod(cfg.batch_size, world)
    micro = cfg.micro_batch_size or per_rank
    if rem or per_rank % micro:
        raise ConfigError(f"batch_size {cfg.batch_size} must split into {world} rank(s) × whole "
                          f"micro-batches of {micro} sequences")
    accum = per_rank // micro
    tokens_per_step = cfg.batch_size * cfg.seq_len
    total_steps = cfg.max_steps or math.ceil(cfg.max_tokens / tokens_per_step)
    warmup_steps = math.ceil(cfg.warmup_frac * total_steps)
    if dataset is None:
        if cfg.data is None:
            raise ConfigError("no data: set `data` in the train config to a prepared dataset directory")
        dataset = TokenDataset.open(cfg.data)
    if dataset.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's "
                          f"({cfg.model.vocab_size})")
    ckpt = latest_checkpoint(out_dir)
    if resume is True and ckpt is None:
        raise GrowfamError(f"nothing to resume: {out_dir} holds no checkpoint")
    if resume is False and ckpt is not None:
        raise GrowfamError(f"{out_dir} holds checkpoints of an earlier run (latest: {ckpt.name}); "
                           "resume it, or choose another out_dir to start over")
    run_config = json.loads(json.dumps(cfg.to_dict()))
    if ckpt is not None:
        check_resumable(read_trainer_state(ckpt)["config"], run_config, ckpt)

    # ---- model, data, optimizer ------------------------------------------------------------------
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use the TF32 tensor cores
    if model is None:
        torch.manual_seed(cfg.seed)
        model = Llama(cfg.model)  # initialised on the CPU, so the same seed gives the same model anywhere
    if tokenizer is None and hasattr(dataset, "tokenizer"):
        tokenizer = dataset.tokenizer()
    windows = PackedWindows(dataset.tokens("train"), cfg.seq_len, micro, cfg.seed, rank=rank,
                            world_size=world, max_unique_tokens=cfg.max_unique_tokens)
    val_tokens = dataset.tokens("val")
    if len(val_tokens) <= cfg.seq_len:
        if rank == 0:
            print(f"growfam train: the validation split holds no window of {cfg.seq_len + 1} tokens; "
                  "training without validation")
        val_tokens = None
    model.to(device)
    if optimizer is None:
        optimizer = make_optimizer(model, cfg, device)
    else:
        _check_optimizer(model, optimizer)
        # load_state_dict casts every state tensor to its parameter's device and dtype.
        optimizer.load_state_dict(optimizer.state_dict())
    apply_hyperparameters(optimizer, cfg)
    guard = SpikeGuard(cfg.spike_factor, cfg.spike_patience, cfg.spike_window, cfg.spike_lr_factor,
                       cfg.max_rollbacks, baseline=math.log(model.cfg.vocab_size))
    ledger = {"tokens_processed": 0, "flops": 0, "flops_attn": 0, "wall_s": 0.0}
    n_nonemb = num_params(model.cfg, "nonembedding")
    attn_per_token = flops_per_token(model.cfg, cfg.seq_len)
    step, train_loss, val_loss = 0, None, None
    window_losses: list[float] = []  # accepted losses since the last `train` log line

    # ---- resume ----------------------------------------------------------------------------------
    if rank == 0:
        remove_stale_temporaries(checkpoint_root(out_dir))  # of checkpoint writes that were killed
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, device)
        apply_hyperparameters(optimizer, cfg)
        try:
            step, train_loss, val_loss = state["step"], state["train_loss"], state["val_loss"]
            # Ranks advance in lock-step, so rank 0's cursor position is every rank's.
            windows.load_state_dict({**state["data"], "rank": rank})
            guard.load_state_dict(state["guard"])
            ledger = state["ledger"]
            window_losses = [float(x) for x in state.get("window_losses", [])]
            decode_rng(state["rng"])
            _masks_from_dict(model, state["masks"])
        except GrowfamError:
            raise  # the checkpoint is whole but does not fit this run (another data stream, ...)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise broken_checkpoint(ckpt, f"{STATE_FILE}: {type(err).__name__}: {err}") from None
        if state["finished"]:  # a completed run: nothing to do but report it
            return _result(train_loss, val_loss, step, tokens_per_step, ledger, guard, ckpt,
                           state["stopped_early"])

    log = MetricsLogger(out_dir, enabled=rank == 0, resume=ckpt is not None, tensorboard=cfg.tensorboard,
                        wandb_project=cfg.wandb_project, run_config=run_config)
    if ckpt is not None:
        log.log("resume", step, checkpoint=str(ckpt))
    loss_fn = torch.compile(model.loss) if cfg.compile else model.loss
    peak = peak_flops(device) if amp_dtype == torch.bfloat16 else None

    def checkpoint_due(step: int) -> bool:
        return step == total_steps or bool(cfg.ckpt_every and step % cfg.ckpt_every == 0)

    def checkpoint(finished: bool = False, stopped_early: bool = False) -> Path:
        state = {
            "step": step, "total_steps": total_steps, "tokens": step * tokens_per_step,
            "train_loss": train_loss, "val_loss": val_loss, "finished": finished,
            "stopped_early": stopped_early, "data": windows.state_dict(), "rng": encode_rng(),
            "guard": guard.state_dict(), "masks": _masks_to_dict(model), "ledger": ledger,
            "window_losses": window_losses, "world_size": world, "config": run_config,
        }
        if rank == 0:
            save_checkpoint(out_dir, step, model, optimizer, state, tokenizer=tokenizer, keep_last=cfg.keep_last)
            log.log("checkpoint", step)
        _barrier(world)
        return latest_checkpoint(out_dir)

    def diverged(reason: str) -> TrainingDiverged:
        """Log the stop and close up; the error to raise. Nothing more is written."""
        good = latest_checkpoint(out_dir)
        log.log("diverged", step, reason=reason, checkpoint=str(good) if good else None, lr_scale=guard.lr_scale)
        log.close()
        bar.close()
        kept = f"keeping the last checkpoint, {good.name}" if good else "no checkpoint was written"
        return TrainingDiverged(f"training diverged at step {step}: {reason}; stopped, {kept}. "
                                f"Lower max_lr and start again in a new out_dir (not {out_dir})")

    # ---- the loop ------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    session_start = time.perf_counter() - ledger["wall_s"]
    stopped_early = False
    model.train()
    while step < total_steps:
        lr = lr_at(step, total_steps, *lr_bounds(cfg, guard.lr_scale), warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        loss = forward_backward(loss_fn, [windows.next_batch() for _ in range(accum)], device, amp_dtype)
        _average_over_ranks([loss] + [p.grad for p in model.parameters() if p.grad is not None], world)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        loss_value, norm_value = loss.item(), grad_norm.item()
        verdict = guard.check(step, loss_value, norm_value)
        if verdict == "ok":
            optimizer.step()
            advance_masks(model)
        optimizer.zero_grad(set_to_none=True)
        step += 1
        ledger["tokens_processed"] += tokens_per_step
        ledger["flops"] += 6 * n_nonemb * tokens_per_step
        ledger["flops_attn"] += attn_per_token * tokens_per_step
        ledger["wall_s"] = time.perf_counter() - session_start
        window_tokens += tokens_per_step
        bar.update(1)

        # An update that overflowed the weights is never checkpointed: go back instead. (Checked
        # only when a checkpoint is due; otherwise the next loss shows it as NaN.)
        overflow = verdict == "ok" and checkpoint_due(step) and bool(nonfinite_tensors(model, optimizer))
        if overflow or (verdict == "skip" and step == total_steps and guard.streak):
            # Nor does a run end amid spikes it was rolled back for and has not got past.
            verdict = guard.rollback(step)
        if verdict != "ok":
            log.log("spike", step, loss=loss_value, grad_norm=norm_value, running_mean=guard.mean,
                    baseline=guard.baseline, lr=lr, action=verdict, nonfinite_weights=overflow)
            what = "NaN/inf weights" if overflow else f"loss spike ({loss_value:.4g}, grad norm {norm_value:.4g})"
            bar.write(f"step {step}: {what}; update skipped")
        if verdict == "diverged":
            reason = (f"{guard.streak} rollbacks in a row (max LR down to {cfg.max_lr * guard.lr_scale:.3g}) "
                      f"did not get past step {guard.rolled_back_at + 1}") if guard.streak else \
                "repeated loss spikes and max_rollbacks is 0"
            raise diverged(reason)
        if verdict == "rollback":
            back_to = latest_checkpoint(out_dir)
            if back_to is not None:
                state = load_checkpoint(back_to, model, optimizer, device)
                apply_hyperparameters(optimizer, cfg)
                step = state["step"]
                _masks_from_dict(model, state["masks"])
                bar.reset(total=total_steps)
                bar.update(step)
            elif nonfinite_tensors(model, optimizer):
                raise diverged("NaN/inf in the weights and no checkpoint to roll back to")
            elif step == total_steps:
                raise diverged("the last step was a loss spike and there is no checkpoint to roll back to")
            # The data cursor runs on: the batches around the spike are not replayed.
            log.log("rollback", step, checkpoint=str(back_to) if back_to else None, lr_scale=guard.lr_scale)
            where = f"rolled back to step {step}" if back_to else "no checkpoint to roll back to"
            bar.write(f"repeated loss spikes: {where}; max LR now {cfg.max_lr * guard.lr_scale:.3g}")
            continue
        if verdict == "ok":
            window_losses.append(loss_value)

        if step % cfg.log_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            train_loss = sum(window_losses) / len(window_losses) if window_losses else train_loss
            mfu = attn_per_token * tokens_per_s / (peak * world) if peak else None
            log.log("train", step, loss=train_loss, lr=lr, grad_norm=norm_value, tokens=step * tokens_per_step,
                    tokens_per_s=tokens_per_s, flops=ledger["flops"], flops_attn=ledger["flops_attn"],
                    mfu=mfu, epoch=windows.epoch)
            bar.set_postfix(loss=f"{train_loss:.4f}" if train_loss is not None else "-", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_s:,.0f}", **({"mfu": f"{mfu:.1%}"} if mfu else {}))
            window_losses, window_start, window_tokens = [], time.perf_counter(), 0

        pause = time.perf_counter()  # validation and checkpoint time is not training throughput
        if val_tokens is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total_steps):
            model.eval()
            val_loss = evaluate(loss_fn, val_tokens, cfg, micro, device, amp_dtype, rank, world)
            model.train()
            log.log("eval", step, val_loss=val_loss)
            bar.write(f"step {step}: val loss {val_loss:.4f}")
            if on_eval is not None and on_eval(step, val_loss):
                stopped_early = True
                break
        # Only after an accepted step: a checkpoint taken amid spikes keeps the state they come
        # from, and rollbacks would return to it.
        if checkpoint_due(step) and step < total_steps and verdict == "ok":
            checkpoint()
        window_start += time.perf_counter() - pause

    bar.close()
    final = checkpoint(finished=True, stopped_early=stopped_early)
    log.close()
    return _result(train_loss, val_loss, step, tokens_per_step, ledger, guard, final, stopped_early)


def _check_out_dir(out_dir: Path) -> None:
    """ConfigError when out_dir, or the nearest folder above it that exists, is not a folder."""
    for path in (out_dir, *out_dir.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                raise ConfigError(f"cannot write to out_dir {out_dir}: {path} is not a directory")
            return


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig's fields that define the network (not its name or advertised size)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("name", "nominal_params")}


def _result(train_loss, val_loss, step: int, tokens_per_step: int, ledger: dict, guard: SpikeGuard,
            hf_dir: Path, stopped_early: bool) -> TrainResult:
    return TrainResult(train_loss=train_loss, val_loss=val_loss, steps=step, tokens=step * tokens_per_step,
                       flops=ledger["flops"], flops_attn=ledger["flops_attn"], wall_s=ledger["wall_s"],
                       hf_dir=Path(hf_dir), spikes=guard.spikes, rollbacks=guard.rollbacks,
                       stopped_early=stopped_early)
