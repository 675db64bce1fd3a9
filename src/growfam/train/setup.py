"""Before the training loop: every input checked, the run's parts built, a checkpoint resumed.

`check_inputs` validates a run before any work or write; `build_run` makes its parts (the
model laid out by the Parallelism, its optimizer, data, guard); `resume_run` loads a checkpoint
into them. train() (train/loop.py) calls them in this order.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from growfam.data import open_dataset, train_windows
from growfam.errors import ConfigError, GrowfamError
from growfam.grow.masks import attach_masks, mask_state
from growfam.io import check_folder
from growfam.model import Llama, ModelConfig, flops_per_token, num_params
from growfam.train.callbacks import Checkpoints, load_states
from growfam.train.checkpoint import (STATE_FILE, broken_checkpoint, latest_checkpoint, named_optimizer_state,
                                      read_trainer_state)
from growfam.train.config import TrainConfig, check_resumable
from growfam.train.guard import SpikeGuard
from growfam.train.optim import apply_hyperparameters, check_optimizer, make_optimizer
from growfam.train.parallel import Parallelism, amp_dtype, share
from growfam.train.state import Run, Schedule, decode_rng, empty_ledger
from growfam.train.teacher import Teacher, check_teacher




def check_inputs(cfg: TrainConfig, model: Llama | None, dataset, resume: bool | None,
                  world: int) -> tuple[TrainConfig, Schedule, Any, Path | None]:
    """Check every input before any work or write. Returns the config with its model filled in,
    the schedule, the dataset (opened from cfg.data unless given) and the checkpoint to resume."""
    out_dir = Path(cfg.out_dir)
    check_folder(out_dir, "out_dir")
    if model is None and cfg.model is None:
        raise ConfigError("no model: set `model` in the train config or pass one to train()")
    if model is not None and cfg.model is not None and _shape(cfg.model) != _shape(model.cfg):
        raise ConfigError(f"the model handed to train() is not the configured one: {model.cfg} vs {cfg.model}")
    if cfg.model is None:
        cfg = cfg.replace(model=model.cfg)
    schedule = Schedule.of(cfg, world)
    if dataset is None:
        if cfg.data is None:
            raise ConfigError("no data: set `data` in the train config to a prepared dataset directory or a mixture")
        dataset = open_dataset(cfg.data)
    check_vocabulary(dataset, cfg.model)
    if cfg.distill is not None:
        check_teacher(cfg.distill, cfg.model, dataset, cfg.seq_len)
    if cfg.eval_batches and validation_tokens(dataset, cfg.seq_len) is None:
        raise ConfigError(f"the validation split holds {len(dataset.tokens('val')):,} tokens, not one window of "
                          f"{cfg.seq_len + 1}: prepare the data with a larger val_fraction, or set eval_batches: 0 "
                          "to train without validation")
    ckpt = latest_checkpoint(out_dir)
    if resume is True and ckpt is None:
        raise GrowfamError(f"nothing to resume: {out_dir} holds no checkpoint")
    if resume is False and ckpt is not None:
        raise GrowfamError(f"{out_dir} holds checkpoints of an earlier run (latest: {ckpt.name}); "
                           "resume it, or choose another out_dir to start over")
    if ckpt is not None:
        check_resumable(read_trainer_state(ckpt)["config"], run_config(cfg), ckpt)
    return cfg, schedule, dataset, ckpt


def build_run(cfg: TrainConfig, schedule: Schedule, parallel: Parallelism, model: Llama | None,
              optimizer: torch.optim.Optimizer | None, dataset, tokenizer, resuming: bool = False) -> Run:
    """The run's parts: the model on its device (seeded when fresh), data, optimizer, guard.
    resuming: a checkpoint will be loaded into them (nothing is sent between ranks first)."""
    device = parallel.device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 runs use the TF32 tensor cores
    if model is None:
        torch.manual_seed(cfg.seed)
        # initialised on the CPU, so the same seed gives the same model anywhere (on rank 0 only
        # when the others receive it, and not at all when a checkpoint will replace it)
        if not parallel.from_main or (parallel.is_main and not resuming):
            model = Llama(cfg.model)
    if tokenizer is None and hasattr(dataset, "tokenizer"):
        tokenizer = dataset.tokenizer()
    windows = train_windows(dataset, cfg.seq_len, schedule.micro_batch, cfg.seed, rank=parallel.rank,
                            world_size=parallel.world, max_unique_tokens=cfg.max_unique_tokens)
    val_tokens = validation_tokens(dataset, cfg.seq_len) if cfg.eval_batches else None
    if parallel.from_main:
        model, optimizer = _from_main(cfg, parallel, model, optimizer, send=not resuming)
    else:
        model = parallel.wrap(model)
        if optimizer is None:
            optimizer = make_optimizer(model, cfg, device)
        else:
            check_optimizer(model, optimizer)
            # load_state_dict casts every state tensor to its parameter's device and dtype.
            optimizer.load_state_dict(optimizer.state_dict())
    apply_hyperparameters(optimizer, cfg)
    teacher = None if cfg.distill is None else \
        Teacher.load(cfg.distill, parallel, amp_dtype(cfg.dtype, device), cfg.parallel.loss_chunk, cfg.seq_len)
    guard = SpikeGuard(cfg.spike_factor, cfg.spike_patience, cfg.spike_window, cfg.spike_lr_factor,
                       cfg.max_rollbacks, baseline=math.log(model.cfg.vocab_size))
    return Run(cfg=cfg, schedule=schedule, parallel=parallel, model=model, optimizer=optimizer,
               loss_fn=_loss_fn(parallel.loss_fn(model), cfg.compile, cfg.parallel.compile),
               amp_dtype=amp_dtype(cfg.dtype, device), windows=windows,
               val_tokens=val_tokens, guard=guard, tokenizer=tokenizer, run_config=run_config(cfg),
               nonembedding_params=num_params(model.cfg, "nonembedding"),
               attn_flops_per_token=flops_per_token(model.cfg, cfg.seq_len), teacher=teacher)


def check_vocabulary(dataset, model: ModelConfig) -> None:
    """ConfigError when the dataset holds token ids the model has no embedding for."""
    if dataset.vocab_size > model.vocab_size:
        raise ConfigError(f"the dataset's vocabulary ({dataset.vocab_size}) is larger than the model's "
                          f"({model.vocab_size})")


def validation_tokens(dataset, seq_len: int):
    """The dataset's validation tokens (1-D), or None when they hold no window of seq_len + 1."""
    tokens = dataset.tokens("val")
    return tokens if len(tokens) > seq_len else None


def _from_main(cfg: TrainConfig, parallel: Parallelism, source: Llama | None,
               source_optimizer: torch.optim.Optimizer | None, send: bool) -> tuple[Llama, torch.optim.Optimizer]:
    """The model and optimizer of a run whose ranks all start from rank 0's `source` (and its
    optimizer's AdamW state, growth masks): every rank builds the shape on the meta device,
    the strategy lays it out (sharded, or whole on each rank) and, if `send`, rank 0's state
    is sent (otherwise they stay uninitialised for a checkpoint to fill)."""
    with torch.device("meta"):
        skeleton = Llama(cfg.model)
    model = parallel.wrap(skeleton)
    optimizer = make_optimizer(model, cfg, parallel.device)
    if not send:
        return model, optimizer
    moments = None
    if parallel.is_main and source_optimizer is not None:
        check_optimizer(source, source_optimizer)
        moments = named_optimizer_state(source_optimizer.state_dict(), source, source_optimizer)
    parallel.load_from_main(model, optimizer, source.state_dict() if parallel.is_main else None, moments)
    masks = share(mask_state(source) if parallel.is_main else None)
    if masks is not None:
        attach_masks(model, masks)
    return model, optimizer


def resume_run(run: Run, ckpt: Path) -> dict[str, Any]:
    """Load checkpoint `ckpt` into the run: weights, AdamW state, progress, data cursor, guard,
    RNG, callbacks' states. Its trainer state; a broken_checkpoint error when it does not load."""
    saved = Checkpoints.load(run, ckpt)
    state = run.state
    try:
        state.step, state.train_loss, state.val_loss = saved["step"], saved["train_loss"], saved["val_loss"]
        # Ranks advance in lock-step, so rank 0's cursor position is every rank's.
        run.windows.load_state_dict({**saved["data"], "rank": run.parallel.rank})
        run.guard.load_state_dict(saved["guard"])
        state.ledger = {**empty_ledger(), **saved["ledger"]}
        state.window_losses = [float(x) for x in saved.get("window_losses", [])]
        state.window_parts = {k: [float(x) for x in v] for k, v in saved.get("window_parts", {}).items()}
        state.stopped_early = saved["stopped_early"]
        decode_rng(saved["rng"])
        load_states(run.callbacks, saved)
    except GrowfamError:
        raise  # the checkpoint is whole but does not fit this run (another data stream, ...)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise broken_checkpoint(ckpt, f"{STATE_FILE}: {type(err).__name__}: {err}") from None
    return saved


def _loss_fn(loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], compile: bool,
             blocks_compiled: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The strategy's loss function, compiled on request. Forward hooks come and go during a
    run (growth masks): compiled code (the whole loss, or each block) guards on them, which
    torch.compile does not do by default."""
    if compile:
        loss = torch.compile(loss)
    elif not blocks_compiled:
        return loss
    return torch._dynamo.config.patch(skip_nnmodule_hook_guards=False)(loss)


def run_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as JSON values: what checkpoints record and a resume is compared with."""
    return json.loads(json.dumps(cfg.to_dict()))


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig's fields that define the network (not its name or advertised size)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("name", "nominal_params")}
