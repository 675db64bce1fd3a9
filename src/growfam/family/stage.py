"""One stage of a family: its TrainConfig, the growth into it, its training and its published
member (the body of run_family's loop, in family.pipeline).

`build_stage(job, mode, i, members)` trains stage `i` of `mode` (growing it from the previous
member first in progressive mode, or resuming it from its last checkpoint), publishes the member
as a Hugging Face directory (rank 0) and returns its MemberEntry. `stage_train_config` is the
stage's TrainConfig (the plan's values and the family's `train:` section); `ConvergenceStop`
ends a stage early under `growth.schedule: converged`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from growfam.config import FamilyConfig, GrowthConfig
from growfam.data import TokenDataset, token_rows
from growfam.errors import ConfigError, GrowfamError
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import MemberEntry
from growfam.family.plan import FamilyPlan
from growfam.io import atomic_directory, atomic_write_text, read_json
from growfam.model import copy_tokenizer_files, load_pretrained, resolve_config
from growfam.text import loss
from growfam.train import Schedule, TrainConfig, TrainResult, make_optimizer, train, validation_loss
from growfam.train.checkpoint import checkpoint_at, latest_checkpoint, load_checkpoint
from growfam.train.parallel import on_main, rank_and_world, share


def stage_train_config(family: FamilyConfig, plan: FamilyPlan, index: int, mode: str, data: str | None,
                       out_dir: Path, tokens: float, fixed_data: bool) -> TrainConfig:
    """The TrainConfig of stage `index` (0-based) in `mode`: plan values + the `train:` section.

    A grown member under `distill: {inherit: ...}` learns from the member it grew from (the
    previous one, as published). An error in a key of the train section names it as `train.KEY`."""
    stage = plan.stages[index]
    cap = int(plan.stages[-1].tokens_independent) if fixed_data else None
    inherit = family.distill.inherit_spec(str(FamilyDirectory(out_dir).member(mode, plan.stages[index - 1].name))) \
        if mode == "progressive" and index > 0 else None
    if inherit is not None and family.train.given.get("distill") is not None:
        raise ConfigError("train.distill and distill.inherit both give a grown member a teacher; keep one")
    if family.lr.warmup is not None and "warmup_frac" in family.train.given:
        raise ConfigError("lr.warmup and train.warmup_frac both set the warm-up; keep one")
    try:
        return TrainConfig.from_dict({
            **family.train.given,
            **family.lr.train_fields(),
            **({"distill": inherit.to_dict()} if inherit is not None else {}),
            "model": family.members[index].to_dict(),
            "data": data,
            "out_dir": str(FamilyDirectory(out_dir).run(mode, stage.name)),
            "max_tokens": max(1, int(round(tokens))),
            "batch_size": stage.batch_size,
            "seq_len": stage.seq_len,
            "max_lr": stage.max_lr,
            "min_lr": stage.min_lr,
            "max_unique_tokens": cap,
        })
    except ConfigError as err:
        # TrainConfig's messages start with the field at fault
        if str(err).split(" ", 1)[0] in family.train.given:
            raise ConfigError(f"train.{err}") from None
        raise


class ConvergenceStop:
    """on_eval callback: True once |slope| of the last `window` validation losses < `slope`.

    The slope is the least-squares fit of loss against step (nats per step).
    """

    def __init__(self, slope: float, window: int):
        self.threshold, self.window = slope, window
        self.points: list[tuple[int, float]] = []
        self.last_slope: float | None = None

    def __call__(self, step: int, val_loss: float) -> bool:
        self.points.append((step, val_loss))
        if len(self.points) < self.window:
            return False
        x, y = np.array(self.points[-self.window:], dtype=np.float64).T
        self.last_slope = float(np.polyfit(x, y, 1)[0])
        return abs(self.last_slope) < self.threshold


def _weight_files(src: Path) -> list[str]:
    """The names of a Hugging Face directory's weight files: model.safetensors, or the index of
    a sharded one and its shards."""
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file() or not index.is_file():
        return ["model.safetensors"]
    return [index.name, *sorted(set(read_json(index)["weight_map"].values()))]


def publish(result: TrainResult, member_dir: Path) -> None:
    """Copy the final checkpoint's (or a given member's) Hugging Face files into the member
    directory (atomically)."""
    src = Path(result.hf_dir)
    extra = ["generation_config.json"] if (src / "generation_config.json").is_file() else []

    def write(tmp: Path) -> None:
        for name in ("config.json", *extra, *_weight_files(src)):
            shutil.copy2(src / name, tmp / name)
        copy_tokenizer_files(src, tmp)

    atomic_directory(member_dir, write)


def _grow_from(prev_run: Path, tcfg: TrainConfig, target, growth: GrowthConfig, probe, given=None,
               stable_step: int | None = None):
    """Load the previous member's final checkpoint (weights + AdamW state), or with growth from
    the stable phase its checkpoint at `stable_step`, and expand it; or, when that member was
    `given` untrained (a start_from model), expand it with fresh moments.

    A masked ramp must end inside the stage: a Hugging Face member cannot hold the masks."""
    from growfam.grow import expand

    ckpt = latest_checkpoint(prev_run) if stable_step is None else checkpoint_at(prev_run, stable_step)
    if ckpt is None and given is None:
        which = "no checkpoint" if stable_step is None else f"no stable checkpoint at step {stable_step}"
        raise GrowfamError(f"{prev_run} holds {which} to grow from")
    source = load_pretrained(ckpt) if ckpt is not None else given
    optimizer = None
    if growth.optimizer == "transfer" and ckpt is not None:
        optimizer = make_optimizer(source, tcfg.replace(model=source.cfg), torch.device("cpu"))
        load_checkpoint(ckpt, source, optimizer)  # whole, or every shard of a sharded one, read here
    steps = tcfg.total_steps
    mask_steps = min(growth.mask_steps or max(1, steps // 4), steps)
    model, optimizer, report = expand(source, target, width=growth.width, depth=growth.depth,
                                      seed=growth.seed, optimizer=optimizer, probe=probe,
                                      mask_steps=mask_steps)
    return model, optimizer, report


def _stable_point(job: FamilyRun, tcfg: TrainConfig, result: TrainResult) -> dict:
    """Where the next member grows from (growth.from stable): the stable checkpoint's step, and
    the decay branch after it (its tokens and FLOPs, inside the stage's budget)."""
    schedule = Schedule.of(tcfg, rank_and_world()[1])
    share = (schedule.total_steps - schedule.stable_end) / schedule.total_steps
    return {"from": "stable", "step": schedule.stable_end, "branch_tokens": round(result.tokens * share),
            "branch_flops": result.flops * share}


def _stable_step(previous: MemberEntry) -> int | None:
    """The step the next member grows from: the previous member's stable checkpoint, or None
    (its final checkpoint)."""
    point = previous.growth_point or {}
    return point.get("step") if point.get("from") == "stable" else None


def _progressive_tokens(plan: FamilyPlan, index: int, done: list[MemberEntry]) -> float:
    """Stage `index`'s budget: the plan's Eq. 4 value, or, when an earlier stage grew early
    (converged schedule), Eq. 4 recomputed from the tokens the earlier stages really used."""
    stage = plan.stages[index]
    if not any(m.stopped_early for m in done):
        return stage.tokens_progressive
    spent = sum(plan.stages[j].params * (m.tokens + plan.stages[j].given_tokens) for j, m in enumerate(done))
    tokens = stage.tokens_independent - spent / stage.params
    if tokens <= 0:
        raise GrowfamError(f"stage {stage.name}: earlier stages already used its whole budget")
    return tokens


def _probe_batch(dataset, seq_len: int, n_tokens: int) -> torch.Tensor | None:
    """Validation tokens as [B, seq_len] for measuring what an expansion changes."""
    val = dataset.tokens("val")
    rows = min(max(1, n_tokens // seq_len), len(val) // seq_len)
    if rows == 0:
        return None
    return torch.from_numpy(token_rows(val, np.arange(rows) * seq_len, seq_len))


@dataclass
class FamilyRun:
    """What every stage of one run_family call shares. given: the start_from model (None
    without one); given_loss: its validation loss, measured once for both modes."""

    family: FamilyConfig
    plan: FamilyPlan
    growth: GrowthConfig
    out_dir: Path
    data: str
    dataset: TokenDataset
    fixed_data: bool
    given: torch.nn.Module | None
    log: Callable[[str], object]
    main: bool
    given_loss: float | None = None


def _grown(job: FamilyRun, mode: str, i: int, tcfg: TrainConfig, previous: MemberEntry):
    """Stage `i`'s model grown from the previous member's final checkpoint, its AdamW moments
    (rank 0; None elsewhere: train() sends them), and tcfg with the grown shape (every rank)."""
    plan, growth, stage = job.plan, job.growth, job.plan.stages[i]
    stable = _stable_step(previous)
    job.log(f"[{mode}] expanding {plan.stages[i - 1].name} -> {stage.name} "
            f"(width {growth.width}, depth {growth.depth}, optimizer {growth.optimizer}"
            + (f"; from its stable checkpoint, step {stable})" if stable is not None else ")"))

    def grow():  # rank 0; the others receive the grown model from it in train()
        grown, moments, report = _grow_from(FamilyDirectory(job.out_dir).run(mode, plan.stages[i - 1].name), tcfg,
                                            job.family.members[i], growth,
                                            _probe_batch(job.dataset, stage.seq_len, growth.probe_tokens),
                                            job.given if i == 1 else None, stable)
        job.log(str(report))
        Path(tcfg.out_dir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(FamilyDirectory(job.out_dir).growth_report(mode, stage.name),
                          json.dumps(report.to_dict(), indent=1) + "\n")
        return grown, moments

    model, optimizer = on_main(grow) or (None, None)
    return model, optimizer, tcfg.replace(model=share(model.cfg if job.main else None))


def build_stage(job: FamilyRun, mode: str, i: int, members: list[MemberEntry]) -> MemberEntry:
    """Train (growing it first in progressive mode) or resume stage `i` of `mode`, publish the
    member (rank 0) and return its ledger entry. members: the mode's finished members before it."""
    plan, growth, out_dir, log = job.plan, job.growth, job.out_dir, job.log
    stage = plan.stages[i]
    # progressive: Eq. 4 again when an earlier stage grew early (converged schedule)
    tokens = _progressive_tokens(plan, i, members) if mode == "progressive" else stage.tokens(mode)
    tcfg = stage_train_config(job.family, plan, i, mode, job.data, out_dir, tokens, job.fixed_data)
    run_dir = Path(tcfg.out_dir)
    growth_report = FamilyDirectory(out_dir).growth_report(mode, stage.name)
    resume_from = latest_checkpoint(run_dir)
    model = optimizer = None
    given = i == job.family.given_index and job.given is not None  # start_from's member
    if given and resume_from is None:
        model = job.given  # continued from its weights, with fresh AdamW moments
    if mode == "progressive" and i > 0 and resume_from is None:
        model, optimizer, tcfg = _grown(job, mode, i, tcfg, members[-1])
    elif resume_from is not None:
        # resuming: the checkpoint holds the grown shape (lossless growth changes norm_eps)
        tcfg = tcfg.replace(model=resolve_config(resume_from))
    stop = ConvergenceStop(growth.slope, growth.window) \
        if growth.schedule == "converged" and mode == "progressive" and i < len(plan.stages) - 1 else None
    start = time.perf_counter()
    if given and tokens == 0:
        log(f"[{mode}] {stage.name}: given, start_from {job.family.start_from}")
        if job.given_loss is None:  # measured once, as training would measure it: both modes publish it
            job.given_loss = validation_loss(tcfg, job.given, job.dataset)
        result = TrainResult(None, job.given_loss, 0, 0, 0, 0, 0.0, Path(job.family.start_from))
    else:
        log(f"[{mode}] training {stage.name}: {tcfg.max_tokens:,} tokens, max LR {tcfg.max_lr:.3g}")
        result = train(tcfg, model, optimizer, dataset=job.dataset, on_eval=stop)
    member_dir = FamilyDirectory(out_dir).member(mode, stage.name)
    on_main(lambda: publish(result, member_dir))
    flops_before = members[-1].cum_flops if (members and mode == "progressive") else stage.given_flops
    distill = None if tcfg.distill is None else {**tcfg.distill.to_dict(), "flops": result.flops_teacher}
    entry = MemberEntry(
        name=stage.name, dir=str(member_dir), config=resolve_config(result.hf_dir).replace(name=stage.name).to_dict(),
        params=stage.params, nonembedding_params=stage.nonembedding_params, total_params=stage.total_params,
        tokens=result.tokens, planned_tokens=tokens, steps=result.steps, flops=result.flops,
        flops_attn=result.flops_attn, cum_flops=flops_before + result.flops + result.flops_teacher,
        val_loss=result.val_loss,
        train_loss=result.train_loss, max_lr=tcfg.max_lr, wall_s=result.wall_s,
        session_wall_s=time.perf_counter() - start, spikes=result.spikes, rollbacks=result.rollbacks,
        stopped_early=result.stopped_early, growth=read_json(growth_report) if growth_report.exists() else None,
        done=True,
        given={"dir": job.family.start_from, "tokens": stage.given_tokens, "flops": stage.given_flops}
        if stage.given_tokens else None,
        growth_point={"step": result.steps, "val_loss_slope": stop.last_slope} if stop is not None
        else _stable_point(job, tcfg, result) if growth.source == "stable" and mode == "progressive"
        and i < len(plan.stages) - 1 and result.steps else None,
        distill=distill)
    log(f"[{mode}] {stage.name}: val loss {loss(result.val_loss)}, {result.tokens:,} tokens, "
        f"{result.flops:.3g} FLOPs, {result.wall_s:.0f} s")
    return entry
