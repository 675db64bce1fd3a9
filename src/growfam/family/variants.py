"""Distilled variants of a built family's members (the family YAML's `distill: {retro, draft}`).

Once every member of a mode is done, each smaller member gets a short run against a teacher of
the same mode, and the result is published beside it as FAMILY/<mode>/<member>+<kind>:

- retro: the teacher is the largest member. Distillation pays when the teacher already exists
  and serves several students (Busbridge et al., "Distillation Scaling Laws", arXiv 2502.08606).
- draft: the teacher is the next larger member, which the variant is meant to draft for in
  speculative decoding (DistillSpec, Zhou et al., arXiv 2310.08461). It learns on the training
  data, not on sequences the teacher generates (DistillSpec's on-policy choice is not built).

Each variant starts from the published member's weights with fresh AdamW moments (a published
member holds none), trains on `tokens` × the member's from-scratch budget D(N_i) at `lr` × its
stage's peak (and floor) learning rate, with the rest of the family's train section, and is
resumable like a stage. Both modes get the same variants, so the comparison stays fair. Its
ledger entry (`variants` in family.json) records the settings, the teacher, the student's 6·N·D
and the teacher's 2·N_t·D FLOPs; its cum_flops is its member's plus both (the teacher's own
training is not counted again: it exists already).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from growfam.config import FamilyConfig
from growfam.errors import ConfigError
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import Ledger, MemberEntry, write_ledger
from growfam.family.plan import FamilyPlan
from growfam.family.stage import FamilyRun, publish, stage_train_config
from growfam.model import load_pretrained, resolve_config
from growfam.text import loss
from growfam.train import TrainConfig, train
from growfam.train.checkpoint import latest_checkpoint
from growfam.train.parallel import on_main


def variant_name(member: str, kind: str) -> str:
    return f"{member}+{kind}"


def settings(family: FamilyConfig, kind: str) -> dict:
    """What a variant of `kind` is built with, as its ledger entry records it (teacher aside)."""
    return {k: v for k, v in family.distill.spec(kind, "-").to_dict().items() if k != "teacher"} | \
        {"tokens": getattr(family.distill, kind)["tokens"], "lr": getattr(family.distill, kind)["lr"]}


def check_variants(family: FamilyConfig, ledger: Ledger | None, out_dir: Path) -> None:
    """ConfigError, before any work, when a variant this family builds was built before with
    other settings (nothing is replaced: the user removes it, or builds elsewhere)."""
    if ledger is None or not ledger.variants:
        return
    for mode, entries in ledger.variants.items():
        for entry in entries:
            kind = entry.extra.get("kind")
            if kind not in family.distill.variants() or not entry.done:
                continue
            recorded = {k: v for k, v in (entry.distill or {}).items() if k not in ("teacher", "flops")}
            if recorded != settings(family, kind):
                directory = FamilyDirectory(out_dir)
                raise ConfigError(f"{mode}/{entry.name} was built with other distill.{kind} settings ({recorded}); "
                                  f"remove {directory.member(mode, entry.name)} and {directory.run(mode, entry.name)} "
                                  "to build it again, or use another --out")


def variant_train_config(family: FamilyConfig, plan: FamilyPlan, mode: str, kind: str, student: int, teacher: int,
                         out_dir: Path, data: str | None, fixed_data: bool) -> TrainConfig:
    """The TrainConfig of the `kind` variant of stage `student` in `mode`, taught by stage `teacher`."""
    section, stage, directory = getattr(family.distill, kind), plan.stages[student], FamilyDirectory(out_dir)
    tokens = next(v.tokens for v in plan.variants if v.name == variant_name(stage.name, kind))
    base = stage_train_config(family, plan, student, mode, data, out_dir, tokens, fixed_data)
    member = directory.member(mode, stage.name)
    return base.replace(
        model=resolve_config(member) if member.is_dir() else base.model,
        out_dir=str(directory.run(mode, variant_name(stage.name, kind))),
        max_lr=stage.max_lr * section["lr"], min_lr=stage.min_lr * section["lr"],
        distill=family.distill.spec(kind, str(directory.member(mode, plan.stages[teacher].name))))


def build_variants(job: FamilyRun, ledger: Ledger, modes: tuple[str, ...]) -> Ledger:
    """Build (or skip, when done) every variant the family asks for, in each of `modes` whose
    members are all done; the ledger, written after each (rank 0)."""
    family, plan, out_dir = job.family, job.plan, job.out_dir
    for mode in modes:
        members = ledger.members(mode)
        if len(members) < len(plan.stages) or not all(m.done for m in members):
            continue
        for kind in family.distill.variants():
            for student, teacher in family.distill.pairs(kind, len(plan.stages)):
                name = variant_name(plan.stages[student].name, kind)
                entries = (ledger.variants or {}).get(mode, [])
                done = next((e for e in entries if e.name == name and e.done), None)
                if done is not None:
                    job.log(f"[{mode}] {name}: done (val loss {loss(done.val_loss)})")
                    continue
                entry = _build(job, mode, kind, student, teacher, members)
                ledger.variants = {**(ledger.variants or {}), mode: [*(e for e in entries if e.name != name), entry]}
                on_main(lambda: write_ledger(out_dir, ledger))
    return ledger


def _build(job: FamilyRun, mode: str, kind: str, student: int, teacher: int, members: list[MemberEntry]) -> MemberEntry:
    """Train and publish one variant; its ledger entry."""
    plan, directory = job.plan, FamilyDirectory(job.out_dir)
    stage, base = plan.stages[student], members[student]
    name = variant_name(stage.name, kind)
    tcfg = variant_train_config(job.family, plan, mode, kind, student, teacher, job.out_dir, job.data, job.fixed_data)
    fresh = latest_checkpoint(Path(tcfg.out_dir)) is None
    model = on_main(lambda: load_pretrained(directory.member(mode, stage.name), dtype=torch.float32)) if fresh else None
    job.log(f"[{mode}] distilling {name} from {plan.stages[teacher].name}: {tcfg.max_tokens:,} tokens, "
            f"max LR {tcfg.max_lr:.3g}")
    start = time.perf_counter()
    result = train(tcfg, model, None, dataset=job.dataset)
    on_main(lambda: publish(result, directory.member(mode, name)))
    spent = result.flops + result.flops_teacher
    job.log(f"[{mode}] {name}: val loss {loss(base.val_loss)} -> {loss(result.val_loss)}, {result.tokens:,} tokens, "
            f"{spent:.3g} FLOPs (teacher {result.flops_teacher:.3g}), {result.wall_s:.0f} s")
    return MemberEntry(
        name=name, dir=str(directory.member(mode, name)),
        config=resolve_config(result.hf_dir).replace(name=name).to_dict(),
        params=stage.params, nonembedding_params=stage.nonembedding_params, total_params=stage.total_params,
        tokens=result.tokens, planned_tokens=tcfg.max_tokens, steps=result.steps, flops=result.flops,
        flops_attn=result.flops_attn, cum_flops=base.cum_flops + spent, val_loss=result.val_loss,
        train_loss=result.train_loss, max_lr=tcfg.max_lr, wall_s=result.wall_s,
        session_wall_s=time.perf_counter() - start, spikes=result.spikes, rollbacks=result.rollbacks, done=True,
        distill={**settings(job.family, kind), "teacher": tcfg.distill.teacher, "flops": result.flops_teacher},
        extra={"of": stage.name, "kind": kind, "teacher_member": plan.stages[teacher].name,
               "before": {"val_loss": base.val_loss}})
