"""Callbacks: what the training loop does around its steps, each job in one place.

A callback implements any of these hooks (the base class's do nothing); `run` is the
`state.Run` of the run, `run.state` its progress:

- on_train_start(run): before the first step of this session (after a resume).
- on_update(run): the optimizer has just applied an update (not called for a skipped step).
- on_step_end(run) -> bool | None: a step that stands (was not rolled back) is done; True
  stops the run there (the callbacks after this one are not called; the run ends with its
  final checkpoint).
- on_rollback(run, checkpoint): the run went back to `checkpoint` (None: none to go back to).
- on_train_end(run): no more steps: the run is over, stopped, or diverged.
- state_key, state_dict(), load_state_dict(saved): a callback with a state_key has its
  state_dict() saved under that key of trainer_state.json, and restored on resume and
  rollback.

Built in, in the order train() calls them: MaskRamp (the masked-growth ramp), Progress (the
`train` log line, the progress bar), Validation (the `eval` line, train()'s on_eval),
Checkpoints (periodic and final checkpoints, and loading them back).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from growfam.data import eval_windows
from growfam.grow.masks import MaskState, advance_masks, attach_masks, fold_masks, mask_state
from growfam.model import Llama
from growfam.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from growfam.train.config import TrainConfig
from growfam.train.metrics import peak_flops
from growfam.train.optim import apply_hyperparameters
from growfam.train.parallel import Parallelism
from growfam.train.state import Run, encode_rng


class Callback:
    """The hooks the loop calls; see the module docstring. Every one does nothing here."""

    state_key: str | None = None

    def on_train_start(self, run: Run) -> None:
        pass

    def on_update(self, run: Run) -> None:
        pass

    def on_step_end(self, run: Run) -> bool | None:
        return None

    def on_rollback(self, run: Run, checkpoint: Path | None) -> None:
        pass

    def on_train_end(self, run: Run) -> None:
        pass

    def state_dict(self) -> Any:
        return None

    def load_state_dict(self, saved: Any) -> None:
        pass


def load_states(callbacks: list[Callback], saved: dict[str, Any]) -> None:
    """Restore every callback that has a state from a checkpoint's trainer state."""
    for callback in callbacks:
        if callback.state_key is not None:
            callback.load_state_dict(saved[callback.state_key])


class MaskRamp(Callback):
    """Moves a masked-growth ramp (growfam.grow.masks) one step after every applied update;
    checkpoints carry its position under "masks" (None without masks: they are hooks, outside
    the model's state dict)."""

    state_key = "masks"

    def __init__(self, model: Llama) -> None:
        self.model = model

    def on_update(self, run: Run) -> None:
        advance_masks(self.model)

    def state_dict(self) -> dict[str, Any] | None:
        state = mask_state(self.model)
        return None if state is None else dataclasses.asdict(state)

    def load_state_dict(self, saved: dict[str, Any] | None) -> None:
        fold_masks(self.model)  # drop whatever ramp the model is on now
        if saved is not None:
            attach_masks(self.model, MaskState(**saved))


class Progress(Callback):
    """Every `log_every` steps and at the last: a `train` line (the mean accepted loss of the
    window, LR, grad norm, tokens/s, FLOPs, MFU on a GPU whose peak is known); a progress bar
    on rank 0. Throughput counts the steps that stand and their forward, backward and update
    time only (not validation, checkpoints or rollbacks)."""

    def on_train_start(self, run: Run) -> None:
        self.bar = tqdm(total=run.schedule.total_steps, initial=run.state.step, disable=not run.parallel.is_main,
                        unit="step", dynamic_ncols=True)
        self.peak = peak_flops(run.parallel.device) if run.amp_dtype == torch.bfloat16 else None
        self.window_s, self.window_tokens = 0.0, 0

    def on_step_end(self, run: Run) -> None:
        state, tokens_per_step = run.state, run.schedule.tokens_per_step
        self.bar.update(1)
        self.window_s += state.seconds
        self.window_tokens += tokens_per_step
        if state.step % run.cfg.log_every and state.step != run.schedule.total_steps:
            return
        tokens_per_s = self.window_tokens / self.window_s
        if state.window_losses:
            state.train_loss = sum(state.window_losses) / len(state.window_losses)
        mfu = run.attn_flops_per_token * tokens_per_s / (self.peak * run.parallel.world) if self.peak else None
        # with a teacher: the loss's parts (cross-entropy; divergence None when no step had α > 0)
        teacher = {} if run.teacher is None else {
            "ce": _mean(state.window_parts.get("ce")), "kl": _mean(state.window_parts.get("kl")),
            "alpha": state.alpha, "flops_teacher": state.ledger["flops_teacher"]}
        run.log.log("train", state.step, loss=state.train_loss, lr=state.lr, grad_norm=state.grad_norm,
                    tokens=state.step * tokens_per_step, tokens_per_s=tokens_per_s, flops=state.ledger["flops"],
                    flops_attn=state.ledger["flops_attn"], mfu=mfu, epoch=run.windows.epoch, **teacher)
        self.bar.set_postfix(loss=f"{state.train_loss:.4f}" if state.train_loss is not None else "-",
                             **({"kl": f"{teacher['kl']:.4f}"} if teacher.get("kl") is not None else {}),
                             lr=f"{state.lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                             **({"mfu": f"{mfu:.1%}"} if mfu else {}))
        state.window_losses, state.window_parts, self.window_s, self.window_tokens = [], {}, 0.0, 0

    def on_rollback(self, run: Run, checkpoint: Path | None) -> None:
        self.bar.reset(total=run.schedule.total_steps)
        self.bar.update(run.state.step)

    def on_train_end(self, run: Run) -> None:
        self.close()

    def close(self) -> None:
        """Close the bar (again, or before it was opened: nothing happens)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()


def _mean(values: list[float] | None) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def evaluate(loss_fn: Callable, val_tokens, cfg: TrainConfig, batch_size: int, parallel: Parallelism,
             amp_dtype: torch.dtype | None) -> float:
    """Mean validation loss over fixed, evenly spread windows: `eval_batches` one-process
    micro-batches of them (the same windows at any world size), in batches of `batch_size`
    sequences shared out over the ranks."""
    device = parallel.device
    total = torch.zeros(2, device=device)  # sum of losses × windows, windows
    windows = cfg.eval_batches * (cfg.micro_batch_size or cfg.batch_size)
    batches = eval_windows(val_tokens, cfg.seq_len, windows, batch_size)
    for i, (x, y) in enumerate(batches):
        if i % parallel.world != parallel.rank:
            continue
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = loss_fn(x.to(device), y.to(device)).float()
        total += torch.stack([loss * len(x), torch.tensor(float(len(x)), device=device)])
    parallel.average([total])
    return (total[0] / total[1]).item()


class Validation(Callback):
    """Every `eval_every` steps and at the last (when the data has a validation split): the
    validation loss, logged as `eval`. on_eval(step, val_loss) returning True stops the run."""

    def __init__(self, on_eval: Callable[[int, float], bool | None] | None = None) -> None:
        self.on_eval = on_eval

    def on_step_end(self, run: Run) -> bool:
        state, cfg = run.state, run.cfg
        due = (cfg.eval_every and state.step % cfg.eval_every == 0) or state.step == run.schedule.total_steps
        if run.val_tokens is None or not due:
            return False
        run.model.eval()
        state.val_loss = evaluate(run.loss_fn, run.val_tokens, cfg, run.schedule.micro_batch, run.parallel,
                                  run.amp_dtype)
        run.model.train()
        run.log.log("eval", state.step, val_loss=state.val_loss)
        tqdm.write(f"step {state.step}: val loss {state.val_loss:.4f}")
        return self.on_eval is not None and bool(self.on_eval(state.step, state.val_loss))


class Checkpoints(Callback):
    """A checkpoint every `ckpt_every` steps (after an accepted step), at a WSD run's stable
    point and at the steps `average:` averages (these kept through pruning) and at the end, written
    by rank 0 (by every rank, each its shards, under FSDP); and loading one back into the model
    and optimizer."""

    @staticmethod
    def due(run: Run, step: int) -> bool:
        return step == run.schedule.total_steps or step in Checkpoints.kept(run) or \
            bool(run.cfg.ckpt_every and step % run.cfg.ckpt_every == 0)

    @staticmethod
    def kept(run: Run) -> tuple[int, ...]:
        """Steps whose checkpoints are always written and never pruned: a WSD run's stable
        checkpoint (the last before the decay; growth from the stable phase starts there) and
        the checkpoints `average:` averages."""
        stable = (run.schedule.stable_end,) if run.schedule.decay_steps else ()
        return stable + (tuple(run.cfg.average.steps(run.schedule.total_steps)) if run.cfg.average else ())

    def on_step_end(self, run: Run) -> None:
        # Only after an accepted step: a checkpoint taken amid spikes keeps the state they come
        # from, and rollbacks would return to it.
        step = run.state.step
        if self.due(run, step) and step < run.schedule.total_steps and run.state.verdict == "ok":
            self.save(run)

    @staticmethod
    def save(run: Run, finished: bool = False) -> Path:
        """Write the checkpoint of the current step (every rank waits for it); the latest one."""
        state = run.state
        trainer_state = {
            "step": state.step, "total_steps": run.schedule.total_steps,
            "tokens": state.step * run.schedule.tokens_per_step, "train_loss": state.train_loss,
            "val_loss": state.val_loss, "finished": finished, "stopped_early": state.stopped_early,
            "data": run.windows.state_dict(), "rng": encode_rng(), "guard": run.guard.state_dict(),
            **{cb.state_key: cb.state_dict() for cb in run.callbacks if cb.state_key is not None},
            "ledger": state.ledger, "window_losses": state.window_losses, "window_parts": state.window_parts,
            "world_size": run.parallel.world,
            "config": run.run_config,
        }
        if run.parallel.is_main or run.parallel.sharded:  # a sharded model is written by every rank
            save_checkpoint(run.out_dir, state.step, run.model, run.optimizer, trainer_state,
                            tokenizer=run.tokenizer, keep_last=run.cfg.keep_last, parallel=run.parallel,
                            keep=Checkpoints.kept(run))
            run.log.log("checkpoint", state.step)
        run.parallel.barrier()
        return latest_checkpoint(run.out_dir)

    @staticmethod
    def load(run: Run, path: Path) -> dict[str, Any]:
        """Copy checkpoint `path` into the model and optimizer (this config's hyperparameters
        applied); its trainer state. The run's state and the callbacks' are the caller's."""
        saved = load_checkpoint(path, run.model, run.optimizer, run.parallel.device, run.parallel)
        apply_hyperparameters(run.optimizer, run.cfg)
        return saved
