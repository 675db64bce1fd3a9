"""A family built downward (`direction: shrink`): the mode `shrink` of run_family.

The largest member trains as a stage on its D(N), or is given (start_from); each smaller one,
from the top down, is made by `growfam shrink`'s code (family/shrink.py) from its source — the
member above it, or the largest (shrink.from) — at its source's last checkpoint, AdamW moments
included, and recovered on its planned tokens with the stage's batch, sequence length and
learning rates. Its run folder FAMILY/runs/shrink/<member> is a shrink output; the member is
published to FAMILY/shrink/<member>.
Under torchrun every rank trains the largest and each recovery; rank 0 alone prunes (from the
source's consolidated checkpoint), measures and writes, the others waiting for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from growfam.config import FamilyConfig
from growfam.errors import ConfigError
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import Ledger, MemberEntry, write_ledger
from growfam.family.shrink import SHAPE_FIELDS, ShrinkOptions, shrink_directory, target_config
from growfam.family.stage import FamilyRun, build_stage
from growfam.grow.importance import random_importance, select
from growfam.model import ModelConfig, resolve_config
from growfam.text import loss
from growfam.train.checkpoint import latest_checkpoint
from growfam.train.parallel import on_main


SHRINK_MODE = "shrink"


def build_shrink_mode(job: FamilyRun, ledger: Ledger, published: Callable[[str, MemberEntry, bool], Ledger]) -> Ledger:
    """Build (or skip, when done) every member of the shrink mode, the largest first: it trains
    as a stage on its D(N); each smaller one is pruned from its source (the member above, or
    the largest: shrink.from), its AdamW moments too, and recovered on its planned tokens. Its
    run folder FAMILY/runs/shrink/<member> is a shrink output (shrink.json, importance.json,
    pruned/, recovery/); the member is published to FAMILY/shrink/<member>. Returns the ledger,
    written after each member; published(mode, entry, trained) as run_family's."""
    plan = job.plan
    entries = {m.name: m for m in ledger.members(SHRINK_MODE)}
    for i in range(len(plan.stages) - 1, -1, -1):
        stage = plan.stages[i]
        if stage.name in entries and entries[stage.name].done:
            job.log(f"[{SHRINK_MODE}] {stage.name}: done (val loss {loss(entries[stage.name].val_loss)})")
            ledger = published(SHRINK_MODE, entries[stage.name], False)
            continue
        entry = build_stage(job, SHRINK_MODE, i, []) if i == len(plan.stages) - 1 else _shrunk_member(job, i, entries)
        entries[stage.name] = entry
        ledger.modes[SHRINK_MODE] = [entries[s.name] for s in plan.stages if s.name in entries]
        on_main(lambda: write_ledger(job.out_dir, ledger))
        ledger = published(SHRINK_MODE, entry, True)
        entries = {m.name: m for m in ledger.members(SHRINK_MODE)}
    return ledger


def _source(job: FamilyRun, index: int) -> Path:
    """Where member `index` of the shrink mode is pruned from: its final checkpoint (weights and
    AdamW moments), or its published directory when the run holds none."""
    directory, stage = FamilyDirectory(job.out_dir), job.plan.stages[index]
    checkpoint = latest_checkpoint(directory.training_run(SHRINK_MODE, stage.name, index < len(job.plan.stages) - 1))
    return checkpoint if checkpoint is not None else directory.member(SHRINK_MODE, stage.name)


def shrink_step_options(job: FamilyRun, index: int) -> ShrinkOptions:
    """The ShrinkOptions of member `index`: the family's shrink section, the stage's seq_len,
    batch and learning rates (× shrink.lr), its planned recovery tokens and the train section."""
    section, stage = job.family.shrink, job.plan.stages[index]
    return ShrinkOptions(width=section.width, depth=section.depth, calibration=section.calibration,
                         seq_len=stage.seq_len, recover=section.recover, tokens=max(1, round(stage.tokens_shrink)),
                         train={**job.family.train.given, "batch_size": stage.batch_size,
                                "max_lr": stage.max_lr * section.lr, "min_lr": stage.min_lr * section.lr},
                         seed=job.family.growth.seed)


def member_shape(cfg: ModelConfig) -> str:
    """`cfg`'s shape as `--to FIELD=N,...`."""
    return ",".join(f"{k}={getattr(cfg, k)}" for k in SHAPE_FIELDS)


def _shrunk_member(job: FamilyRun, index: int, entries: dict[str, MemberEntry]) -> MemberEntry:
    """Prune, recover and publish member `index`; its ledger entry."""
    plan, directory = job.plan, FamilyDirectory(job.out_dir)
    stage, teacher = plan.stages[index], plan.stages[job.family.shrink.teacher(index, len(plan.stages))]
    source, member_dir = _source(job, teacher.index - 1), directory.member(SHRINK_MODE, stage.name)
    job.log(f"[{SHRINK_MODE}] pruning {teacher.name} -> {stage.name}, recovering on {stage.tokens_shrink:,.0f} tokens "
            f"({job.family.shrink.recover})")
    start = time.perf_counter()
    record = shrink_directory(str(source), member_shape(job.family.members[index]), job.data,
                              str(directory.run(SHRINK_MODE, stage.name)), shrink_step_options(job, index),
                              log=job.log, owned=True, model_dir=member_dir)
    rec, held_out = record["recovery"], record["held_out"]
    job.log(f"[{SHRINK_MODE}] {stage.name}: held-out loss pruned {held_out['pruned']:.4f} -> recovered "
            f"{held_out['recovered']:.4f}; val loss {loss(rec['val_loss'])}")
    return MemberEntry(
        name=stage.name, dir=str(member_dir), config=resolve_config(member_dir).replace(name=stage.name).to_dict(),
        params=stage.params, nonembedding_params=stage.nonembedding_params, total_params=stage.total_params,
        tokens=rec["tokens"], planned_tokens=stage.tokens_shrink, steps=rec["steps"], flops=rec["flops"],
        flops_attn=rec["flops_attn"], cum_flops=entries[teacher.name].cum_flops + rec["flops"] + rec["flops_teacher"],
        val_loss=rec["val_loss"], train_loss=rec["train_loss"], max_lr=rec["max_lr"], wall_s=rec["wall_s"],
        session_wall_s=time.perf_counter() - start, spikes=rec["spikes"], rollbacks=rec["rollbacks"], done=True,
        distill={"teacher": str(source), **rec["distill"], "flops": rec["flops_teacher"]}
        if rec["distill"] else None,
        shrink={"from": teacher.name, "source": str(source), "width": record["settings"]["width"],
                "depth": record["settings"]["depth"], "held_out": held_out, "kept": record["kept"],
                "params": record["params"]})


def check_shrink_family(family: FamilyConfig) -> None:
    """ConfigError, before any work, for a pruning step the family's shapes cannot take (each
    member against its source)."""
    members, section = family.members, family.shrink
    for i in range(len(members) - 1):
        source = members[section.teacher(i, len(members))]
        try:
            select(random_importance(source), source, target_config(source, member_shape(members[i])), section.depth)
        except ConfigError as err:
            raise ConfigError(f"shrink {source.name} -> {members[i].name}: {err}") from None
