"""The progressive family pipeline: plan, train stage 1, expand, train stage 2, … (docs/concepts.md).

`run_family(family, out_dir, modes)` builds every member of a family, Progressive (each stage
starts from the expanded previous member and its AdamW state, on its Eq. 4 budget) and/or
Independent (each member from scratch on its full budget), with the same data and
hyper-parameters. Layout under out_dir:

    family.json                   the ledger: plan, and per mode and member what was done
    <mode>/<member>/              each member, a Hugging Face directory
    runs/<mode>/<member>/         its training run: metrics.jsonl, checkpoints/

A family with `start_from: DIR` is given its first member (a family built downward, its
largest: the shrink mode prunes the others from it): both modes publish DIR as it is
(0 tokens, with the validation loss training would report for it; or continue it on
`start_from_tokens`, from its weights with fresh AdamW moments), and Progressive grows stage 2
from it (with fresh moments when DIR was not trained: a release holds none). Independent still
trains every later member from scratch: it is the baseline the grown members are measured
against, and its small member is the same given checkpoint, since retraining it from scratch
would spend D(N_1) on a model nobody asked for. The dataset must be tokenized with DIR's
tokenizer.

Everything is resumable: repeating the same command skips finished members, continues a
stage from its last checkpoint, and redoes an expansion (it is seeded) that had not yet
reached its first checkpoint.

Under torchrun every rank runs run_family: all of them train each stage (train/parallel.py),
rank 0 alone writes the ledger, the members and the growth reports, and grows each member
into the next on the CPU (the previous stage's final checkpoint, consolidated: weights and
AdamW moments); train() sends the grown state from rank 0 to the others' sharded models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from growfam.config import PLANNED, FamilyConfig, GrowthConfig
from growfam.data import Mixture, TokenDataset, open_dataset
from growfam.errors import ConfigError
from growfam.family.directory import MODES, FamilyDirectory
from growfam.family.ledger import Ledger, MemberEntry, check_same_run, read_ledger, write_ledger
from growfam.family.plan import FamilyPlan, make_plan
from growfam.family.downward import SHRINK_MODE, build_shrink_mode, check_shrink_family
from growfam.family.stage import FamilyRun, build_stage, stage_train_config
from growfam.family.variants import build_variants, check_variants
from growfam.io import check_folder, remove_stale_temporaries
from growfam.lock import folder_lock
from growfam.model import load_pretrained
from growfam.text import loss
from growfam.train import Schedule
from growfam.train.parallel import on_main, rank_and_world


def _train_record(family: FamilyConfig, plan: FamilyPlan, out_dir: Path, modes: tuple[str, ...],
                  fixed_data: bool) -> dict:
    """Build every stage's TrainConfig in every mode (so a bad train section fails before any
    work) and return the effective train section: every TrainConfig field the plan leaves free."""
    configs, world = [], rank_and_world()[1]
    for mode in modes:
        for i, stage in enumerate(plan.stages):
            cfg = stage_train_config(family, plan, i, mode, None, out_dir, stage.tokens(mode), fixed_data)
            if cfg.micro_batch_size and cfg.batch_size % cfg.micro_batch_size:
                raise ConfigError(f"train.micro_batch_size {cfg.micro_batch_size} does not divide stage "
                                  f"{stage.name}'s batch_size {cfg.batch_size}")
            try:
                Schedule.of(cfg, world)
                cfg.parallel.resolved(world)
            except ConfigError as err:
                raise ConfigError(f"stage {stage.name}: {err}") from None
            configs.append(cfg)
    return {k: v for k, v in configs[0].to_dict().items() if k not in PLANNED}


@dataclass
class CheckedFamily:
    """What `check_family` validated. header: the ledger fields every run of this family in
    this directory must repeat (all but the data fingerprint), as JSON values; ledger: the
    directory's ledger so far (None for a new family)."""

    modes: tuple[str, ...]
    plan: FamilyPlan
    growth: GrowthConfig
    header: dict
    ledger: Ledger | None


def check_family(family: FamilyConfig, out_dir: str | Path, modes: str | tuple[str, ...] = "both",
                 fixed_data: bool = False) -> CheckedFamily:
    """Validate a family run before any data preparation or write: the modes, the out dir, the
    growth section and every growth step (or pruning step), every stage's train config, and the
    out dir's ledger (its structure, and that this family made it). `modes`: mode names, one name
    or "both" (the family's built mode, progressive or shrink, and independent), "built" (that
    mode alone)."""
    out_dir = Path(out_dir)
    allowed = (family.built_mode, "independent")
    modes = allowed if modes == "both" else allowed[:1] if modes == "built" else \
        (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes:
        raise ConfigError(f"no mode given; use {family.built_mode}, independent or both")
    bad = [m for m in modes if m not in allowed]
    if bad:
        why = f" (a family with direction: {family.direction})" if bad[0] in MODES else ""
        raise ConfigError(f"unknown mode {bad[0]!r}{why}; use {family.built_mode}, independent or both")
    check_folder(out_dir, "--out")
    growth = family.growth
    plan = make_plan(family)
    if "progressive" in modes:  # every growth step is checked now, not after hours of stage 1
        from growfam.grow import GrowthPlan

        for small, large in zip(family.members, family.members[1:]):
            GrowthPlan.make(small, large, growth.width, growth.depth, growth.seed)
    if "shrink" in modes:
        check_shrink_family(family)
    planned = {k: v for k, v in plan.to_dict().items() if k != "variants"}  # variants may be added later
    header = {"plan": json.loads(json.dumps(planned)), "growth": growth.to_dict(),
              "fixed_data": fixed_data, "train": _train_record(family, plan, out_dir, modes, fixed_data),
              # inherit shapes the members; retro/draft only add variants beside them
              "distill": {"inherit": family.distill.inherit} if family.distill.inherit is not None else None}
    if growth.schedule == "converged" and header["train"].get("eval_batches") == 0:
        raise ConfigError("growth.schedule converged watches the validation loss, which train.eval_batches 0 "
                          "turns off")
    ledger = read_ledger(out_dir)
    check_same_run(ledger, header, out_dir)
    check_variants(family, ledger, out_dir)
    return CheckedFamily(modes, plan, growth, header, ledger)


def _forget(ledger: Ledger, mode: str, names: list[str]) -> None:
    """Drop the consistency rows of `mode` that name a member about to be trained again."""
    if ledger.consistency is not None and mode in ledger.consistency.modes:
        ledger.consistency.modes[mode] = [r for r in ledger.consistency.modes[mode]
                                          if not {r["small"], r["large"]} & set(names)]


def run_family(family: FamilyConfig, out_dir: str | Path, *, data: str, modes: str | tuple[str, ...] = "both",
               fixed_data: bool = False, log=print, on_member=None) -> dict:
    """Build every member of `family` in each of `modes`; returns the ledger (also in family.json).

    data: a prepared dataset directory (`growfam data prepare`). fixed_data: cap the unique
    tokens at the largest member's from-scratch budget and repeat them (paper Table 2).
    on_member(mode, entry, trained): called on each finished member in order, once its ledger
    entry is written (trained: in this run, not skipped as done); what it adds to family.json
    (`growfam eval`'s records) is kept. A rerun keeps what `growfam eval` / `consistency`
    recorded, except for a member trained again: its entry starts anew and its pairs' rows go.
    Everything is checked (`check_family`, the dataset) before anything is written; then the
    directory's lock is taken (growfam.lock: a second writer is refused, naming this one).
    Under torchrun every rank calls it (see the module docstring); only rank 0 logs, writes,
    takes the lock and calls on_member, and a failure there is raised on every rank.
    """
    main = rank_and_world()[0] == 0
    out_dir = Path(out_dir)
    checked = check_family(family, out_dir, modes, fixed_data)
    dataset = open_dataset(data)
    given = _check_start_from(family, dataset)
    if dataset.vocab_size > family.members[0].vocab_size:
        raise ConfigError(f"the dataset's tokenizer has {dataset.vocab_size} tokens but the family's "
                          f"vocab_size is {family.members[0].vocab_size}")
    fresh = {**checked.header, "data_fingerprint": dataset.fingerprint(),
             "data_mix": dataset.spec() if isinstance(dataset, Mixture) else None}
    check_same_run(checked.ledger, fresh, out_dir)
    ledger = _started(checked.ledger, fresh, str(data))
    job = FamilyRun(family, checked.plan, checked.growth, out_dir, str(data), dataset, fixed_data, given,
                     log if main else (lambda line: None), main)

    def published(mode: str, entry: MemberEntry, trained: bool) -> Ledger:
        """The ledger once rank 0 has run on_member on the member (the others wait for it)."""
        def evaluate():
            if on_member is not None:
                on_member(mode, entry, trained)
                return read_ledger(out_dir)  # with what on_member recorded
            return None
        now = on_main(evaluate)
        return now if now is not None else ledger

    with contextlib.ExitStack() as held:
        on_main(lambda: held.enter_context(folder_lock(out_dir, "; the family's members and ledger go there")))
        on_main(lambda: _start_ledger(out_dir, ledger))
        for mode in checked.modes:
            if mode == SHRINK_MODE:
                ledger = build_shrink_mode(job, ledger, published)
                continue
            members = ledger.modes.setdefault(mode, [])
            for i, stage in enumerate(checked.plan.stages):
                if i < len(members) and members[i].done:
                    job.log(f"[{mode}] {stage.name}: done (val loss {loss(members[i].val_loss)})")
                    ledger = published(mode, members[i], False)
                    members = ledger.modes[mode]
                    continue
                _forget(ledger, mode, [m.name for m in members[i:]])
                del members[i:]
                members.append(build_stage(job, mode, i, members))
                on_main(lambda: write_ledger(out_dir, ledger))
                ledger = published(mode, members[-1], True)
                members = ledger.modes[mode]
        ledger = build_variants(job, ledger, checked.modes)  # distill: {retro, draft}, once the members are done
    return ledger


def _started(old: Ledger | None, fresh: dict, data: str) -> Ledger:
    """The ledger a run starts from: the directory's (its members, evaluations and sections
    kept) with this run's header, or a new one."""
    if old is None:
        return Ledger(**fresh, data=data, modes={})
    return dataclasses.replace(old, data=data, **fresh)


def _start_ledger(out_dir: Path, ledger: Ledger) -> None:
    """Rank 0, once the lock is held: remove what a killed run left, write the ledger."""
    for folder in (out_dir, *(FamilyDirectory(out_dir).mode(mode) for mode in MODES)):
        remove_stale_temporaries(folder)
    write_ledger(out_dir, ledger)


def _check_start_from(family: FamilyConfig, dataset: TokenDataset):
    """The start_from model (float32, for training and growth), after checking that `dataset`
    was tokenized with its tokenizer; None for a family that starts from scratch."""
    if family.start_from is None:
        return None
    path = Path(family.start_from)
    if not dataset.tokenized_with(path):
        raise ConfigError(f"the dataset {dataset.path} was not tokenized with start_from {path}'s tokenizer; "
                          f"prepare it with `growfam data prepare SOURCE --tokenizer {path}`")
    return load_pretrained(path, dtype=torch.float32)

