"""The train config: TrainConfig (validated, YAML/dict in and out) and what a resumed run may change.

RESUME_FREE_KEYS are the keys that steer logging, bookkeeping and hardware; check_resumable
refuses a config that differs from a checkpoint's in any other key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

from growfam.checks import Section, as_choice, as_int, as_mapping, as_number, check_keys
from growfam.device import check_device
from growfam.errors import ConfigError
from growfam.io import read_yaml
from growfam.data.mixture import parse_mix
from growfam.model import ModelConfig, resolve_config
from growfam.train.distill import DistillConfig

#: The peak LR when a config gives none (the paper's Appendix A, for every size).
DEFAULT_MAX_LR = 3e-4
#: The cosine floor as a fraction of the peak when a config gives neither min_lr nor
#: min_lr_ratio (Llama's convention; the paper states none).
DEFAULT_MIN_LR_RATIO = 0.1


#: parallel.strategy values; "auto" is "none" for one process and "fsdp" for several.
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class ParallelConfig:
    """The `parallel:` section: how the processes torchrun starts share one run.

    strategy: "none" (every rank holds the whole model; gradients averaged one tensor at a time
        after the backward pass), "ddp" (DistributedDataParallel: bucketed all-reduce overlapped
        with the backward pass, none during gradient accumulation), "fsdp" (FSDP2: parameters,
        gradients and AdamW moments sharded over the ranks, each transformer block gathered in
        turn), or "auto" (none for one process, fsdp for several).
    activation_checkpointing: recompute blocks' activations during the backward pass instead
        of keeping them (any strategy): true (every block), false, or N (every Nth block, the
        first included: memory and recomputation in between; 1 is true, 0 false).
    mixed_precision: FSDP's compute dtype: "bf16" gathers the parameters in bfloat16 and
        reduces gradients in float32, "none" keeps float32, "auto" is bf16 when the run computes
        in bfloat16 (TrainConfig.dtype). Master weights and moments stay float32.
    reshard_after_forward: FSDP frees each block's gathered parameters after its forward pass
        and gathers them again for the backward pass (less memory, more communication).
    compile: torch.compile each transformer block (the form that composes with FSDP2).
    replicate: FSDP over R groups (HSDP): the ranks form an R × (world / R) mesh, each group
        of world / R ranks (one node, say) shards the model and the R groups replicate it,
        averaging gradients across groups; 1 shards over every rank. Must divide the world size.
    loss_chunk: tokens per chunk of the fused output head and cross-entropy, whose [tokens,
        vocab] logits then never exist whole (model/loss.py; 0: the plain head and loss). The
        same loss and gradients; 12 bytes per vocabulary entry and token less memory.
    """

    strategy: str = "auto"
    activation_checkpointing: bool | int = False
    mixed_precision: str = "auto"
    reshard_after_forward: bool = True
    compile: bool = False
    replicate: int = 1
    loss_chunk: int = 0

    def __post_init__(self) -> None:
        self.loss_chunk = as_int(self.loss_chunk, "parallel.loss_chunk", 0)
        self.replicate = as_int(self.replicate, "parallel.replicate", 1)
        as_choice(self.strategy, STRATEGIES, "parallel.strategy")
        if self.replicate > 1 and self.strategy in ("none", "ddp"):
            raise ConfigError(f"parallel.replicate is FSDP's (HSDP); strategy {self.strategy} replicates the whole "
                              "model on every rank already")
        as_choice(self.mixed_precision, ("auto", "bf16", "none"), "parallel.mixed_precision")
        for name in ("reshard_after_forward", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"parallel.{name} must be true or false, got {getattr(self, name)!r}")
        every = self.activation_checkpointing
        if not isinstance(every, bool) and not (isinstance(every, int) and every >= 0):
            raise ConfigError("parallel.activation_checkpointing must be true, false or N >= 0 (every Nth block; "
                              f"0: none), got {every!r}")

    @property
    def checkpoint_every(self) -> int:
        """Every how many blocks one is checkpointed (0: none, 1: all); see checkpoint_blocks."""
        every = self.activation_checkpointing
        return (1 if every else 0) if isinstance(every, bool) else every

    @classmethod
    def from_dict(cls, data: Any) -> "ParallelConfig":
        data = {} if data is None else as_mapping(data, "parallel")
        check_keys(data, [f.name for f in dataclasses.fields(cls)], "parallel")
        return cls(**data)

    def resolved(self, world: int) -> str:
        """The strategy for `world` processes ("auto" decided); ConfigError when FSDP's
        `replicate` groups do not divide them."""
        strategy = ("fsdp" if world > 1 else "none") if self.strategy == "auto" else self.strategy
        if strategy == "fsdp" and world % self.replicate:
            raise ConfigError(f"parallel.replicate {self.replicate} must divide the number of processes ({world})")
        return strategy


@dataclass
class AverageConfig(Section):
    """The `average:` section: the run's result is the float64 mean of its last `last`
    checkpoints, `every` steps apart, the final one included (checkpoint averaging at a
    constant learning rate can stand in for the decay; Li et al., "Model Merging in
    Pre-training of Large Language Models", arXiv 2505.12082)."""

    key: ClassVar[str] = "average"
    last: int = 4
    every: int = 100

    def __post_init__(self) -> None:
        self.last = as_int(self.last, "average.last", at_least=2)
        self.every = as_int(self.every, "average.every", at_least=1)

    def steps(self, total_steps: int) -> list[int]:
        """The averaged checkpoints' steps, oldest first; a ConfigError when they do not fit."""
        first = total_steps - (self.last - 1) * self.every
        if first < 1:
            raise ConfigError(f"average: {self.last} checkpoints {self.every} steps apart need more than "
                              f"{total_steps} steps")
        return list(range(first, total_steps + 1, self.every))


@dataclass
class TrainConfig:
    """One training run. Loaded from YAML with `TrainConfig.load`; unknown keys are errors.

    model: a ModelConfig, preset name, config path or dict; None when `train` is handed a model.
    data: a prepared token dataset directory (`growfam data prepare`), a mixture folder, or a
        mixture {mix: [{dir: DATASET, weight: W}, ...]} (growfam.data.mixture).
    out_dir: where metrics.jsonl, tensorboard/ and checkpoints/ go.
    max_steps / max_tokens: the length of the run, exactly one of them (tokens are rounded up
        to whole steps).
    batch_size: global batch in sequences per optimizer step (all ranks together).
    micro_batch_size: sequences per forward pass per rank; None = batch_size / world_size (no
        gradient accumulation). Must divide the per-rank batch.
    seq_len: tokens per training sequence.
    max_lr: peak learning rate. min_lr: absolute floor of the cosine, or min_lr_ratio: floor as
        a fraction of max_lr (at most one of the two; default ratio DEFAULT_MIN_LR_RATIO).
    warmup_frac: fraction of the steps spent warming up linearly (rounded up to whole steps).
    lr_schedule: after the warm-up, "cosine" (to the floor at the last step), "wsd" (warm-up,
        stable at max_lr, then a decay to the floor over the last `decay_frac` of the steps,
        rounded up, shaped by `decay_shape`: linear, cosine or sqrt, 1 − √p) or "constant".
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
        validation windows per evaluation (as one process splits them: the same windows at
        any number of ranks); 0: no validation at all (a dataset whose validation split holds
        no window is refused otherwise).
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
    parallel: a ParallelConfig (or its mapping): DDP / FSDP2 under torchrun.
    average: an AverageConfig (or its mapping): publish the float64 mean of the last checkpoints
        (train/average.py) instead of the final one.
    distill: a DistillConfig (or its mapping): learn from a teacher's distribution too
        (train/distill.py); None: cross-entropy alone.
    """

    model: ModelConfig | None = None
    data: str | dict | None = None
    out_dir: str = "runs/train"
    max_steps: int | None = None
    max_tokens: int | None = None
    batch_size: int = 32
    micro_batch_size: int | None = None
    seq_len: int = 256
    max_lr: float = DEFAULT_MAX_LR
    min_lr: float | None = None
    min_lr_ratio: float | None = None
    warmup_frac: float = 0.01
    lr_schedule: str = "cosine"
    decay_frac: float = 0.2
    decay_shape: str = "linear"
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
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    distill: DistillConfig | None = None
    average: AverageConfig | None = None

    def __post_init__(self) -> None:
        if self.average is not None and not isinstance(self.average, AverageConfig):
            self.average = AverageConfig.from_dict(self.average)
        if not isinstance(self.parallel, ParallelConfig):
            self.parallel = ParallelConfig.from_dict(self.parallel)
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            self.distill = DistillConfig.from_dict(self.distill)
        if self.model is not None:
            self.model = resolve_config(self.model)
        if isinstance(self.data, dict):
            check_keys(self.data, ["mix"], "data")
            parse_mix(self.data.get("mix"))
        elif self.data is not None and not isinstance(self.data, str):
            raise ConfigError(f"data must be a dataset directory or {{mix: [...]}}, got {self.data!r}")
        for name, low in (("batch_size", 1), ("seq_len", 1), ("eval_batches", 0), ("log_every", 1),
                          ("spike_window", 1), ("seed", 0), ("eval_every", 0), ("ckpt_every", 0),
                          ("keep_last", 0), ("spike_patience", 0), ("max_rollbacks", 0)):
            setattr(self, name, as_int(getattr(self, name), name, low))
        for name in ("max_steps", "max_tokens", "micro_batch_size", "max_unique_tokens"):
            if getattr(self, name) is not None:
                setattr(self, name, as_int(getattr(self, name), name, 1))
        self.max_lr = as_number(self.max_lr, "max_lr", above=0)  # 0 would train nothing, silently
        as_choice(self.lr_schedule, SCHEDULES, "lr_schedule")
        as_choice(self.decay_shape, DECAY_SHAPES, "decay_shape")
        self.decay_frac = as_number(self.decay_frac, "decay_frac", above=0, at_most=1)
        for name, low, high in (("warmup_frac", 0, 1), ("eps", 0, None),
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
        if self.compile and self.distill is not None:
            raise ConfigError("compile: true does not cover a distillation loss; compile the blocks instead "
                              "(parallel.compile: true)")
        if self.model is not None:
            check_seq_len(self.seq_len, self.model)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step (all ranks together)."""
        return self.batch_size * self.seq_len

    @property
    def total_steps(self) -> int:
        """The run's length in optimizer steps (max_tokens rounded up to whole steps)."""
        return self.max_steps or steps_for(self.max_tokens, self.tokens_per_step)

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


def steps_for(tokens: float, tokens_per_step: int) -> int:
    """Whole optimizer steps covering `tokens`: ceil(tokens / tokens_per_step). The budget is
    rounded to whole tokens first, so float noise (40e9 -> 40000000000.000004) adds no step."""
    return -(-round(tokens) // tokens_per_step)


def check_seq_len(seq_len: int, model: ModelConfig, who: str = "the model") -> None:
    """ConfigError when sequences of `seq_len` tokens do not fit `model` (its max_seq_len);
    `who` names the model in the message."""
    if seq_len > model.max_seq_len:
        raise ConfigError(f"seq_len {seq_len} exceeds {who}'s max_seq_len {model.max_seq_len}")


#: The learning-rate schedules after the warm-up, and the shapes of WSD's decay (train/optim.py).
SCHEDULES = ("cosine", "wsd", "constant")
DECAY_SHAPES = ("linear", "cosine", "sqrt")
#: Keys newer than some checkpoints, with the value such a checkpoint ran with.
ADDED_KEYS = {"lr_schedule": "cosine", "decay_frac": 0.2, "decay_shape": "linear", "average": None}

#: Config keys that may change between a checkpoint and its resumption: they steer logging,
#: bookkeeping and hardware, not the loss trajectory.
RESUME_FREE_KEYS = frozenset({
    "out_dir", "data", "device", "compile", "micro_batch_size", "eval_every", "eval_batches",
    "ckpt_every", "keep_last", "log_every", "tensorboard", "wandb_project", "max_rollbacks", "parallel",
})


def check_resumable(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """ConfigError naming every trajectory-relevant key that differs from the checkpoint's. The
    teacher's path may change, like the data's (a family directory moved, another working folder)."""
    def relevant(config: dict[str, Any], key: str) -> Any:
        value = config.get(key, ADDED_KEYS.get(key))
        return {k: v for k, v in value.items() if k != "teacher"} if key == "distill" and value else value

    differ = [k for k in sorted(set(saved) | set(current))
              if k not in RESUME_FREE_KEYS and relevant(saved, k) != relevant(current, k)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {saved.get(k, ADDED_KEYS.get(k))!r}, now {current.get(k)!r}"
                          for k in differ)
        raise ConfigError(f"the config does not match the checkpoint {where} ({lines}); "
                          "use the original config, or a new out_dir to start over")


@dataclass
class LRPolicy(Section):
    """Peak (max) learning rate of each stage, and the schedule's shape.

    policy "fixed": every stage peaks at `max` (None: DEFAULT_MAX_LR). policy "linear": the
    peak goes linearly from `start` (first stage) to `end` (last stage), interpolated by stage
    index (`by: index`) or by the counted parameter size (`by: params`). `min_ratio` is the
    schedule's floor as a fraction of the peak. schedule / decay / decay_shape: every stage's
    TrainConfig lr_schedule / decay_frac / decay_shape; warmup: its warmup_frac (None: the
    train section's, or TrainConfig's default).
    """

    key: ClassVar[str] = "lr"
    policy: Literal["fixed", "linear"] = "fixed"
    max: float | None = None
    start: float | None = None
    end: float | None = None
    by: Literal["index", "params"] = "index"
    min_ratio: float = DEFAULT_MIN_LR_RATIO
    schedule: str = "cosine"
    warmup: float | None = None
    decay: float = 0.2
    decay_shape: str = "linear"

    def __post_init__(self) -> None:
        if self.policy == "fixed":
            self.max = as_number(DEFAULT_MAX_LR if self.max is None else self.max, "lr.max", above=0)
            if self.start is not None or self.end is not None:
                raise ConfigError("lr: policy fixed takes `max`, not start/end")
        elif self.policy == "linear":
            self.start = as_number(self.start, "lr.start", above=0)
            self.end = as_number(self.end, "lr.end", above=0)
            if self.max is not None:
                raise ConfigError("lr: policy linear takes start/end, not `max`")
            as_choice(self.by, ("index", "params"), "lr.by")
        else:
            as_choice(self.policy, ("fixed", "linear"), "lr.policy")
        self.min_ratio = as_number(self.min_ratio, "lr.min_ratio", at_least=0, at_most=1)
        as_choice(self.schedule, SCHEDULES, "lr.schedule")
        as_choice(self.decay_shape, DECAY_SHAPES, "lr.decay_shape")
        self.decay = as_number(self.decay, "lr.decay", above=0, at_most=1)
        if self.warmup is not None:
            self.warmup = as_number(self.warmup, "lr.warmup", at_least=0, at_most=1)

    def to_dict(self) -> dict:
        out = {"policy": "fixed", "max": self.max} if self.policy == "fixed" else \
            {"policy": "linear", "start": self.start, "end": self.end, "by": self.by}
        out["min_ratio"] = self.min_ratio
        if self.schedule != "cosine":  # a cosine family's plan stays as it was before schedules
            out.update(schedule=self.schedule, decay=self.decay, decay_shape=self.decay_shape)
        if self.warmup is not None:
            out["warmup"] = self.warmup
        return out

    def train_fields(self) -> dict:
        """The TrainConfig fields this section sets for every stage (the schedule's shape)."""
        out = {"lr_schedule": self.schedule, "decay_frac": self.decay, "decay_shape": self.decay_shape}
        return out if self.warmup is None else {**out, "warmup_frac": self.warmup}

    def max_lrs(self, params: Sequence[float]) -> list[float]:
        """The peak LR of each stage; `params` are the counted sizes (used by `by: params`)."""
        if self.policy == "fixed":
            return [self.max] * len(params)
        if len(params) == 1:
            return [self.start]
        if self.by == "index":
            fractions = [i / (len(params) - 1) for i in range(len(params))]
        else:
            fractions = [(n - params[0]) / (params[-1] - params[0]) for n in params]
        return [self.start + f * (self.end - self.start) for f in fractions]
