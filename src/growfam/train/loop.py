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

The loop itself does 1-3 and the rollbacks; the checks before it, the run's parts and resuming
are in train/setup.py; the rest are callbacks (train/callbacks.py):
MaskRamp, Progress, Validation and Checkpoints, then any the caller adds. Processes and
gradient reduction go through one `Parallelism` (train/parallel.py).

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
ranks (TrainConfig.parallel: DDP, FSDP2, or tensor by tensor), rank 0's model is the one every
rank starts from, only rank 0 logs, and every checkpoint is a Hugging Face directory a single
process can read (under FSDP with the sharded state beside it, which any number of processes
resumes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from growfam.errors import TrainingDiverged
from growfam.io import remove_stale_temporaries
from growfam.lock import folder_lock
from growfam.model import Llama, load_pretrained
from growfam.train.average import AVERAGE_DIR, averaged
from growfam.train.callbacks import Callback, Checkpoints, MaskRamp, Progress, Validation, evaluate, load_states
from growfam.train.checkpoint import checkpoint_root, latest_checkpoint
from growfam.train.config import TrainConfig
from growfam.train.guard import nonfinite_tensors
from growfam.train.metrics import MetricsLogger
from growfam.train.optim import lr_at, lr_bounds
from growfam.train.parallel import make_parallelism, on_main
from growfam.train.setup import build_run, check_inputs, check_vocabulary, resume_run, validation_tokens
from growfam.train.state import Run, Schedule

Batch = tuple[torch.Tensor, torch.Tensor]


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
    flops_teacher: int = 0  # a distillation teacher's forward passes: 2 · N_teacher · tokens it saw


def forward_backward(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     batches: Sequence[Batch], device: torch.device, amp_dtype: torch.dtype | None = None,
                     micro_batch: Callable[[bool], AbstractContextManager] | None = None) -> torch.Tensor:
    """Accumulate into .grad the gradient of the mean loss over equal-sized micro-batches.

    Returns that mean loss (detached, on `device`). Each micro-batch's loss is divided by their
    number before backward, so k micro-batches of b sequences give the gradient of one batch
    of k·b sequences. micro_batch(last): the context of each micro-batch's forward and backward
    (a Parallelism's; none by default).
    """
    total = torch.zeros((), device=device)
    for i, (x, y) in enumerate(batches):
        with micro_batch(i == len(batches) - 1) if micro_batch else contextlib.nullcontext():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(x, y)
            (loss / len(batches)).backward()
        total += loss.detach().float()
    return total / len(batches)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, model: Llama | None = None, optimizer: torch.optim.Optimizer | None = None,
          *, tokenizer=None, on_eval: Callable[[int, float], bool | None] | None = None,
          dataset=None, resume: bool | None = None, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train one stage; returns its TrainResult. See the module docstring for the step.

    model / optimizer: start from these (a grown model and its transferred AdamW state)
        instead of a fresh, seeded initialisation; the optimizer's LR follows the schedule,
        and its betas, eps and weight decay are set from cfg. Under several processes only
        rank 0's are read (the others may pass None, with cfg.model set to its shape).
    tokenizer: saved into every checkpoint (default: the dataset's tokenizer).
    on_eval(step, val_loss): called after each validation; returning True stops the run there
        (with a final checkpoint), e.g. when the loss has converged.
    dataset: an object with `.tokens("train" | "val")` (1-D token arrays) and `.vocab_size`,
        used instead of opening `cfg.data`.
    resume: None resumes when out_dir holds a checkpoint; True requires one; False requires
        none (it never silently continues, nor overwrites, an earlier run).
    callbacks: more hooks (train.callbacks.Callback), called after the built-in ones.

    Guaranteed: the config, model, data, out_dir and the checkpoint to resume are checked
    before any work or write (a GrowfamError, one line). A killed and resumed run trains and
    logs bit-for-bit what the uninterrupted run would. No checkpoint holds NaN/inf; rollbacks
    are bounded, and a run that keeps diverging stops with TrainingDiverged, logged to
    metrics.jsonl, keeping its last good checkpoint. A damaged checkpoint is named along with
    the one to fall back to. A full disk is a GrowfamError that leaves earlier checkpoints
    intact. Temporaries of killed checkpoint writes are removed at the start.
    """
    parallel = make_parallelism(cfg.device, cfg.parallel, cfg.dtype)
    cfg, schedule, dataset, ckpt = check_inputs(cfg, model, dataset, resume, parallel.world)
    if cfg.average is not None:
        cfg.average.steps(schedule.total_steps)  # averaged checkpoints that do not fit: refused now
    with contextlib.ExitStack() as held:
        # one writer per out_dir: a second run there is refused, naming this one's pid
        on_main(lambda: held.enter_context(folder_lock(cfg.out_dir)))
        run = build_run(cfg, schedule, parallel, model, optimizer, dataset, tokenizer, resuming=ckpt is not None)
        checkpoints, progress = Checkpoints(), Progress()
        run.callbacks = [MaskRamp(run.model), progress, Validation(on_eval), checkpoints, *callbacks]
        if parallel.is_main:
            remove_stale_temporaries(checkpoint_root(cfg.out_dir))  # of checkpoint writes that were killed
        if ckpt is not None and resume_run(run, ckpt)["finished"]:
            return _finish(run, ckpt, dataset)  # a completed run: nothing to do but report it
        run.log = MetricsLogger(cfg.out_dir, enabled=parallel.is_main, resume=ckpt is not None,
                                tensorboard=cfg.tensorboard, wandb_project=cfg.wandb_project,
                                run_config=run.run_config)
        if ckpt is not None:
            run.log.log("resume", run.state.step, checkpoint=str(ckpt))
        try:
            try:
                _loop(run, checkpoints)
            finally:
                progress.close()  # first: an error's line must not land on the bar's
            final = checkpoints.save(run, finished=True)
        except BaseException:
            with contextlib.suppress(Exception):  # the first error is the one to report
                run.log.close()  # no file of the run stays open (a caller may go on, or unmount)
            raise
        run.log.close()
        return _finish(run, final, dataset)


def _loop(run: Run, checkpoints: Checkpoints) -> None:
    """The steps of train(), from the run's current step to its last (or an early stop); the
    callbacks' on_train_end at the end."""
    state, guard, model, optimizer, cfg, parallel = run.state, run.guard, run.model, run.optimizer, run.cfg, run.parallel
    schedule = run.schedule
    total_steps = schedule.total_steps
    for callback in run.callbacks:
        callback.on_train_start(run)
    session_start = time.perf_counter() - state.ledger["wall_s"]
    micro_batch = functools.partial(parallel.micro_batch, model)
    model.train()
    while state.step < total_steps:
        started = time.perf_counter()
        state.lr = lr_at(state.step, total_steps, *lr_bounds(cfg, guard.lr_scale), schedule.warmup_steps,
                         cfg.lr_schedule, schedule.decay_steps, cfg.decay_shape)
        for group in optimizer.param_groups:
            group["lr"] = state.lr

        # With a teacher: its loss term while α > 0 (after `until`, plain steps: it is not run)
        state.alpha = run.teacher.spec.alpha(state.step, total_steps) if run.teacher else 0.0
        loss_fn = run.teacher.loss_fn(run.loss_fn, state.alpha) if state.alpha else run.loss_fn

        batches = [run.windows.next_batch() for _ in range(schedule.accum)]
        loss = forward_backward(loss_fn, batches, parallel.device, run.amp_dtype, micro_batch)
        parts = run.teacher.take_parts() if state.alpha else None
        parallel.average([loss] if parts is None else [loss, parts])
        parallel.reduce_gradients(model)
        grad_norm = parallel.clip_grad_norm(model, cfg.grad_clip or math.inf)
        state.loss, state.grad_norm = loss.item(), grad_norm.item()
        state.parts = {} if run.teacher is None else \
            {"ce": state.loss} if parts is None else dict(zip(("ce", "kl"), parts.tolist()))
        # The guard watches the cross-entropy: the total's scale moves with α (and the KD term
        # starts at 0 for a grown student); a divergence blowing up shows in the gradient norm.
        verdict = guard.check(state.step, state.parts.get("ce", state.loss), state.grad_norm)
        if verdict == "ok":
            optimizer.step()
            for callback in run.callbacks:
                callback.on_update(run)
        optimizer.zero_grad(set_to_none=True)
        state.count_step(schedule.tokens_per_step, run.nonembedding_params, run.attn_flops_per_token,
                         wall_s=time.perf_counter() - session_start,
                         teacher_flops_per_token=run.teacher.flops_per_token if state.alpha else (0, 0))
        state.seconds = time.perf_counter() - started

        # An update that overflowed the weights is never checkpointed: go back instead. (Checked
        # only when a checkpoint is due; otherwise the next loss shows it as NaN.)
        overflow = verdict == "ok" and checkpoints.due(run, state.step) and \
            bool(parallel.union(nonfinite_tensors(model, optimizer)))
        if overflow or (verdict == "skip" and state.step == total_steps and guard.streak):
            # Nor does a run end amid spikes it was rolled back for and has not got past.
            verdict = guard.rollback(state.step)
        state.verdict = verdict
        if verdict != "ok":
            _log_spike(run, overflow)
        if verdict == "diverged":
            raise _diverged(run, _spikes_reason(run))
        if verdict == "rollback":
            _roll_back(run, checkpoints)
            continue
        if verdict == "ok":
            state.accept()
        if _step_end(run):
            state.stopped_early = True
            break

    for callback in run.callbacks:
        callback.on_train_end(run)


def validation_loss(cfg: TrainConfig, model: Llama, dataset) -> float | None:
    """The validation loss (nats per token) train(cfg) would report for `model` as it is: the
    same windows, micro-batches, device, autocast dtype and ranks. None when the validation split
    holds no window or cfg.eval_batches is 0. Every rank calls it under torchrun; the model is
    put back where it was. A ConfigError, before any work, for a dataset whose vocabulary the
    model does not cover."""
    check_vocabulary(dataset, model.cfg)
    parallel = make_parallelism(cfg.device, cfg.parallel, cfg.dtype)
    schedule = Schedule.of(cfg, parallel.world)
    tokens = validation_tokens(dataset, cfg.seq_len)
    if tokens is None or not cfg.eval_batches:
        return None
    where, training = next(model.parameters()).device, model.training
    model.to(parallel.device).eval()
    try:
        return evaluate(model.loss, tokens, cfg, schedule.micro_batch, parallel, parallel.compute_dtype)
    finally:
        model.to(where).train(training)


def _step_end(run: Run) -> bool:
    """Call every callback's on_step_end in order; True (stop) as soon as one asks to stop."""
    for callback in run.callbacks:
        if callback.on_step_end(run):
            return True
    return False


def _log_spike(run: Run, overflow: bool) -> None:
    state, guard = run.state, run.guard
    run.log.log("spike", state.step, loss=state.loss, grad_norm=state.grad_norm, running_mean=guard.mean,
                baseline=guard.baseline, lr=state.lr, action=state.verdict, nonfinite_weights=overflow)
    what = "NaN/inf weights" if overflow else f"loss spike ({state.loss:.4g}, grad norm {state.grad_norm:.4g})"
    tqdm.write(f"step {state.step}: {what}; update skipped")


def _spikes_reason(run: Run) -> str:
    """Why the guard refused another rollback, for the TrainingDiverged message."""
    guard = run.guard
    if not guard.streak:
        return "repeated loss spikes and max_rollbacks is 0"
    return (f"{guard.streak} rollbacks in a row (max LR down to {run.cfg.max_lr * guard.lr_scale:.3g}) "
            f"did not get past step {guard.rolled_back_at + 1}")


def _roll_back(run: Run, checkpoints: Checkpoints) -> None:
    """Go back to the latest checkpoint (weights, AdamW state, step, callbacks' states; the
    guard has lowered the LR scale), or on from here when there is none and the weights are
    finite. TrainingDiverged when neither works."""
    state = run.state
    back_to = latest_checkpoint(run.out_dir)
    if back_to is not None:
        saved = checkpoints.load(run, back_to)
        state.step = saved["step"]
        load_states(run.callbacks, saved)
    elif run.parallel.union(nonfinite_tensors(run.model, run.optimizer)):
        raise _diverged(run, "NaN/inf in the weights and no checkpoint to roll back to")
    elif state.step == run.schedule.total_steps:
        raise _diverged(run, "the last step was a loss spike and there is no checkpoint to roll back to")
    # The data cursor runs on: the batches around the spike are not replayed.
    run.log.log("rollback", state.step, checkpoint=str(back_to) if back_to else None, lr_scale=run.guard.lr_scale)
    for callback in run.callbacks:
        callback.on_rollback(run, back_to)
    where = f"rolled back to step {state.step}" if back_to else "no checkpoint to roll back to"
    tqdm.write(f"repeated loss spikes: {where}; max LR now {run.cfg.max_lr * run.guard.lr_scale:.3g}")


def _diverged(run: Run, reason: str) -> TrainingDiverged:
    """Log the stop and close up; the error to raise. Nothing more is written."""
    good = latest_checkpoint(run.out_dir)
    run.log.log("diverged", run.state.step, reason=reason, checkpoint=str(good) if good else None,
                lr_scale=run.guard.lr_scale)
    run.log.close()
    for callback in run.callbacks:
        callback.on_train_end(run)
    kept = f"keeping the last checkpoint, {good.name}" if good else "no checkpoint was written"
    return TrainingDiverged(f"training diverged at step {run.state.step}: {reason}; stopped, {kept}. "
                            f"Lower max_lr and start again in a new out_dir (not {run.out_dir})")


def _finish(run: Run, final: Path, dataset) -> TrainResult:
    """The run's result: its final checkpoint or, with `average:`, the mean of its last
    checkpoints (train/average.py; written by rank 0) with that model's validation loss. A run
    stopped early (on_eval) has no averaged checkpoints: its final one stands."""
    result = _result(run, final)
    if run.cfg.average is None or run.state.stopped_early:
        return result
    steps = run.cfg.average.steps(run.schedule.total_steps)
    on_main(lambda: averaged(run.out_dir, steps, run.tokenizer))
    run.parallel.barrier()
    path = Path(run.out_dir) / AVERAGE_DIR
    mean = load_pretrained(path, dtype=torch.float32)
    return dataclasses.replace(result, hf_dir=path, val_loss=validation_loss(run.cfg, mean, dataset))


def _result(run: Run, hf_dir: Path) -> TrainResult:
    state, ledger = run.state, run.state.ledger
    return TrainResult(train_loss=state.train_loss, val_loss=state.val_loss, steps=state.step,
                       tokens=state.step * run.schedule.tokens_per_step, flops=ledger["flops"],
                       flops_attn=ledger["flops_attn"], wall_s=ledger["wall_s"], hf_dir=Path(hf_dir),
                       spikes=run.guard.spikes, rollbacks=run.guard.rollbacks, stopped_early=state.stopped_early,
                       flops_teacher=ledger.get("flops_teacher", 0))
