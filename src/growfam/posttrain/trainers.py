"""SFT and DPO of one model through TRL's SFTTrainer and DPOTrainer.

Each phase trains in its own folder (TRL's output_dir, with its checkpoint-N/ folders): a
killed phase resumes from its last checkpoint (weights, optimizer, scheduler, RNG and data
position, all restored by the Hugging Face Trainer), and its final model is written through a
temporary folder and renamed. DPO's reference model is loaded from the directory the phase
starts from (TRL cannot rebuild it from a model loaded in memory).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from pathlib import Path

import torch

from ..device import resolve_device
from ..io import atomic_directory
from ..train.parallel import on_main
from .config import PosttrainConfig


def world_size() -> int:
    """Processes of the launch (torchrun and `accelerate launch` set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _common(cfg: PosttrainConfig, out_dir: Path, lr: float, max_length: int, progress: bool) -> dict:
    """The arguments SFTConfig and DPOConfig share (transformers' TrainingArguments)."""
    device = resolve_device(cfg.device, world_size())
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    steps = {"max_steps": cfg.max_steps} if cfg.max_steps else {"num_train_epochs": cfg.epochs}
    return dict(
        output_dir=str(out_dir), learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio,
        per_device_train_batch_size=cfg.micro_batch_size, per_device_eval_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // (cfg.micro_batch_size * world_size()),
        max_length=max_length, seed=cfg.seed, data_seed=cfg.seed, save_strategy="steps",
        save_steps=cfg.save_steps, save_total_limit=2, logging_steps=1, report_to=[], bf16=bf16,
        use_cpu=device.type == "cpu", disable_tqdm=not progress, eval_strategy="no", **steps)


def _quiet_progress():
    """The Trainer's progress bar, with the loss on the bar instead of a printed dict per
    logged step (logging every step feeds the training curves)."""
    from transformers.trainer_callback import ProgressCallback

    class QuietProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and self.training_bar is not None and "loss" in (logs or {}):
                self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)

    return QuietProgress


def _train(trainer, out_dir: Path) -> tuple[float, bool]:
    """Train, from the last checkpoint in `out_dir` when there is one: (seconds, resumed)."""
    from transformers.trainer_callback import ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_quiet_progress())

    last = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    return time.perf_counter() - start, last is not None


def _save(trainer, tokenizer, final: Path) -> None:
    """The trained model and its tokenizer into `final`, by rank 0 (the others wait)."""
    def write(tmp: Path) -> None:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle: nothing of ours ships one
    on_main(lambda: atomic_directory(final, write))


def _curve(trainer) -> list[dict]:
    """The training curve: (step, loss) at every logged step, with DPO's reward accuracy."""
    keep = ("loss", "rewards/accuracies", "rewards/margins", "learning_rate")
    return [{"step": e["step"], **{k: e[k] for k in keep if k in e}}
            for e in trainer.state.log_history if "loss" in e]


def sft_lengths(tokenizer, conversations: list, max_length: int) -> dict[str, int]:
    """How many conversations `max_length` truncates, and how many of those keep no assistant
    token (TRL drops those)."""
    truncated = no_reply = 0
    for turns in conversations:
        out = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        if len(out["input_ids"]) > max_length:
            truncated += 1
            no_reply += not any(out["assistant_masks"][:max_length])
    return {"truncated": truncated, "dropped: no reply token within max_length": no_reply}


def dpo_lengths(tokenizer, pairs: list, max_length: int) -> dict[str, int]:
    """How many pairs `max_length` truncates, and how many prompts fill it alone (TRL drops
    those)."""
    truncated = no_reply = 0
    for pair in pairs:
        prompt = len(tokenizer.apply_chat_template(pair["prompt"], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"])
        longest = max(len(tokenizer.apply_chat_template(pair["prompt"] + pair[k], tokenize=True,
                                                        return_dict=True)["input_ids"]) for k in ("chosen", "rejected"))
        truncated += longest > max_length
        no_reply += prompt >= max_length
    return {"truncated": truncated, "dropped: prompt fills max_length": no_reply}


@contextlib.contextmanager
def _quiet(progress: bool):
    """TRL 1.16 calls transformers' gradient-checkpointing names that transformers 5 deprecates,
    a FutureWarning per call that says nothing to a user: hidden. Without progress, the
    datasets library's per-map bars go too."""
    import datasets

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(gradient|activation)_?checkpointing", category=FutureWarning)
        bars = datasets.is_progress_bar_enabled()
        if not progress:
            datasets.disable_progress_bars()
        try:
            yield
        finally:
            if bars and not progress:
                datasets.enable_progress_bars()


def dropped(counts: dict[str, int]) -> int:
    """Records sft_lengths or dpo_lengths counted as dropped (no reply token within max_length)."""
    return sum(v for k, v in counts.items() if k.startswith("dropped"))


def _model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def sft(start: Path, tokenizer, train: list, held: list, cfg: PosttrainConfig, out_dir: Path, final: Path,
        max_length: int, progress: bool = True) -> dict:
    """SFT of the model at `start` on `train` conversations, the loss on assistant tokens only;
    the result is saved to `final`. Returns the held-out loss before and after (nats per
    assistant token), steps, wall seconds, the counts of sft_lengths and the training curve."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with _quiet(progress):
        args = SFTConfig(**_common(cfg, out_dir, cfg.sft_lr, max_length, progress), assistant_only_loss=True)
        trainer = SFTTrainer(model=_model(start), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list([{"messages": c} for c in train]),
                             eval_dataset=Dataset.from_list([{"messages": c} for c in held]))
        measured = dropped(sft_lengths(tokenizer, held, max_length)) < len(held)  # else TRL drops them all
        before = trainer.evaluate()["eval_loss"] if measured else None
        wall, resumed = _train(trainer, out_dir)
        after = trainer.evaluate()["eval_loss"] if measured else None
        _save(trainer, tokenizer, final)
    return {"held_out_loss_before": before, "held_out_loss": after, "steps": trainer.state.global_step,
            "wall_s": round(wall, 2), "resumed": resumed, "examples": len(train), "held_out": len(held),
            "max_length": max_length, **sft_lengths(tokenizer, train, max_length), "curve": _curve(trainer)}


def dpo(start: Path, tokenizer, train: list, held: list, cfg: PosttrainConfig, out_dir: Path, final: Path,
        max_length: int, progress: bool = True) -> dict:
    """DPO of the model at `start` against itself as the reference (loaded again from `start`)
    on `train` pairs; the result is saved to `final`. Returns the held-out reward accuracy
    (share of pairs whose chosen reply gains more log-likelihood ratio than the rejected one),
    reward margin (beta times that gap, mean) and loss, before and after, with steps, wall
    seconds, the counts of dpo_lengths and the training curve."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with _quiet(progress):
        args = DPOConfig(**_common(cfg, out_dir, cfg.dpo_lr, max_length, progress), beta=cfg.beta)
        trainer = DPOTrainer(model=_model(start), ref_model=_model(start), args=args, processing_class=tokenizer,
                             train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(held))
        wall, resumed = _train(trainer, out_dir)
        measured = dropped(dpo_lengths(tokenizer, held, max_length)) < len(held)  # else TRL drops them all
        metrics = trainer.evaluate() if measured else {}
        _save(trainer, tokenizer, final)
    return {"reward_accuracy": metrics.get("eval_rewards/accuracies"), "reward_margin": metrics.get("eval_rewards/margins"),
            "held_out_loss": metrics.get("eval_loss"), "steps": trainer.state.global_step, "wall_s": round(wall, 2),
            "resumed": resumed, "pairs": len(train), "held_out": len(held), "max_length": max_length,
            **dpo_lengths(tokenizer, train, max_length), "curve": _curve(trainer)}
