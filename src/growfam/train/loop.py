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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from growfam.data import PackedWindows, TokenDataset, eval_windows
from growfam.errors import ConfigError, GrowfamError, TrainingDiverged
from growfam.grow.masks import MaskState, advance_masks, attach_masks, fold_masks, mask_state
from growfam.io import check_folder, remove_stale_temporaries
from growfam.model import Llama, ModelConfig, flops_per_token, num_params
from growfam.train import parallel
from growfam.train.checkpoint import (STATE_FILE, broken_checkpoint, checkpoint_root, decode_rng, encode_rng,
                                      latest_checkpoint, load_checkpoint, nonfinite_tensors, read_trainer_state,
                                      save_checkpoint)
from growfam.train.config import TrainConfig, check_resumable
from growfam.train.guard import SpikeGuard
from growfam.train.metrics import MetricsLogger, peak_flops
from growfam.train.optim import apply_hyperparameters, check_optimizer, lr_at, lr_bounds, make_optimizer

Batch = tuple[torch.Tensor, torch.Tensor]


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
# Result, validation and small helpers
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
    parallel.average_over_ranks([total], world)
    return (total[0] / total[1]).item()


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
    rank, world = parallel.rank_world()
    device = parallel.resolve_device(cfg.device, world)
    amp_dtype = parallel.amp_dtype(cfg.dtype, device)
    out_dir = Path(cfg.out_dir)

    # ---- check every input before any work or write -------------------------------------------
    check_folder(out_dir, "out_dir")
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
        check_optimizer(model, optimizer)
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
        parallel.barrier(world)
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
        parallel.average_over_ranks([loss] + [p.grad for p in model.parameters() if p.grad is not None], world)
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


def _shape(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig's fields that define the network (not its name or advertised size)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ("name", "nominal_params")}


def _result(train_loss, val_loss, step: int, tokens_per_step: int, ledger: dict, guard: SpikeGuard,
            hf_dir: Path, stopped_early: bool) -> TrainResult:
    return TrainResult(train_loss=train_loss, val_loss=val_loss, steps=step, tokens=step * tokens_per_step,
                       flops=ledger["flops"], flops_attn=ledger["flops_attn"], wall_s=ledger["wall_s"],
                       hf_dir=Path(hf_dir), spikes=guard.spikes, rollbacks=guard.rollbacks,
                       stopped_early=stopped_early)
