"""The progressive family pipeline: plan, train stage 1, expand, train stage 2, … (docs/concepts.md).

`run_family(family, out_dir, modes)` builds every member of a family, Progressive (each stage
starts from the expanded previous member and its AdamW state, on its Eq. 4 budget) and/or
Independent (each member from scratch on its full budget), with the same data and
hyper-parameters. Layout under out_dir:

    family.json                   the ledger: plan, and per mode and member what was done
    <mode>/<member>/              each member, a Hugging Face directory
    runs/<mode>/<member>/         its training run: metrics.jsonl, checkpoints/

A family with `start_from: DIR` is given its first member: both modes publish DIR as it is
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
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from growfam.config import PLANNED, FamilyConfig, GrowthConfig
from growfam.data import DEFAULT_TOKENIZER, TokenDataset, load_tokenizer, token_rows
from growfam.errors import ConfigError, GrowfamError
from growfam.family.directory import MODES, FamilyDirectory
from growfam.family.ledger import Ledger, MemberEntry, check_same_run, read_ledger, write_ledger
from growfam.family.plan import FamilyPlan, make_plan
from growfam.io import atomic_directory, atomic_write_text, check_folder, read_json, remove_stale_temporaries
from growfam.model import copy_tokenizer_files, load_pretrained, resolve_config
from growfam.text import loss
from growfam.train import Schedule, TrainConfig, TrainResult, make_optimizer, train, validation_loss
from growfam.train.checkpoint import latest_checkpoint, load_checkpoint
from growfam.lock import folder_lock
from growfam.train.parallel import on_main, rank_and_world, share

def stage_train_config(family: FamilyConfig, plan: FamilyPlan, index: int, mode: str, data: str | None,
                       out_dir: Path, tokens: float, fixed_data: bool) -> TrainConfig:
    """The TrainConfig of stage `index` (0-based) in `mode`: plan values + the `train:` section.

    An error in a key of the train section names it as `train.KEY`."""
    stage = plan.stages[index]
    cap = int(plan.stages[-1].tokens_independent) if fixed_data else None
    try:
        return TrainConfig.from_dict({
            **family.train,
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
        if str(err).split(" ", 1)[0] in family.train:
            raise ConfigError(f"train.{err}") from None
        raise


def _train_record(family: FamilyConfig, plan: FamilyPlan, out_dir: Path, modes: tuple[str, ...],
                  fixed_data: bool) -> dict:
    """Build every stage's TrainConfig in every mode (so a bad train section fails before any
    work) and return the effective train section: every TrainConfig field the plan leaves free."""
    configs, world = [], rank_and_world()[1]
    for mode in modes:
        for i, stage in enumerate(plan.stages):
            tokens = stage.tokens_independent if mode == "independent" else stage.tokens_progressive
            cfg = stage_train_config(family, plan, i, mode, None, out_dir, tokens, fixed_data)
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


# --------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------


def _weight_files(src: Path) -> list[str]:
    """The names of a Hugging Face directory's weight files: model.safetensors, or the index of
    a sharded one and its shards."""
    index = src / "model.safetensors.index.json"
    if (src / "model.safetensors").is_file() or not index.is_file():
        return ["model.safetensors"]
    return [index.name, *sorted(set(read_json(index)["weight_map"].values()))]


def _publish(result: TrainResult, member_dir: Path) -> None:
    """Copy the final checkpoint's (or a given member's) Hugging Face files into the member
    directory (atomically)."""
    src = Path(result.hf_dir)
    extra = ["generation_config.json"] if (src / "generation_config.json").is_file() else []

    def write(tmp: Path) -> None:
        for name in ("config.json", *extra, *_weight_files(src)):
            shutil.copy2(src / name, tmp / name)
        copy_tokenizer_files(src, tmp)

    atomic_directory(member_dir, write)


def _grow_from(prev_run: Path, tcfg: TrainConfig, target, growth: GrowthConfig, probe, given=None):
    """Load the previous member's final checkpoint (weights + AdamW state) and expand it; or,
    when that member was `given` untrained (a start_from model), expand it with fresh moments.

    A masked ramp must end inside the stage: a Hugging Face member cannot hold the masks."""
    from growfam.grow import expand

    ckpt = latest_checkpoint(prev_run)
    if ckpt is None and given is None:
        raise GrowfamError(f"{prev_run} holds no checkpoint to grow from")
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
class CheckedFamily:
    """What `check_family` validated. header: the ledger fields every run of this family in
    this directory must repeat (all but the data fingerprint), as JSON values; ledger: the
    directory's ledger so far (None for a new family)."""

    modes: tuple[str, ...]
    plan: FamilyPlan
    growth: GrowthConfig
    header: dict
    ledger: Ledger | None


def check_family(family: FamilyConfig, out_dir: str | Path, modes: str | tuple[str, ...] = MODES,
                 fixed_data: bool = False) -> CheckedFamily:
    """Validate a family run before any data preparation or write: the modes, the out dir, the
    growth section and every growth step, every stage's train config, and the out dir's ledger
    (its structure, and that this family made it). `modes`: mode names, one name or "both"."""
    out_dir = Path(out_dir)
    modes = MODES if modes == "both" else (modes,) if isinstance(modes, str) else tuple(modes)
    if not modes:
        raise ConfigError("no mode given; use progressive, independent or both")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown mode {bad[0]!r}; use progressive, independent or both")
    check_folder(out_dir, "--out")
    growth = family.growth
    plan = make_plan(family)
    if "progressive" in modes:  # every growth step is checked now, not after hours of stage 1
        from growfam.grow import GrowthPlan

        for small, large in zip(family.members, family.members[1:]):
            GrowthPlan.make(small, large, growth.width, growth.depth, growth.seed)
    header = {"plan": json.loads(json.dumps(plan.to_dict())), "growth": growth.to_dict(),
              "fixed_data": fixed_data, "train": _train_record(family, plan, out_dir, modes, fixed_data)}
    if growth.schedule == "converged" and header["train"].get("eval_batches") == 0:
        raise ConfigError("growth.schedule converged watches the validation loss, which train.eval_batches 0 "
                          "turns off")
    ledger = read_ledger(out_dir)
    check_same_run(ledger, header, out_dir)
    return CheckedFamily(modes, plan, growth, header, ledger)


def _forget(ledger: Ledger, mode: str, names: list[str]) -> None:
    """Drop the consistency rows of `mode` that name a member about to be trained again."""
    if ledger.consistency is not None and mode in ledger.consistency.modes:
        ledger.consistency.modes[mode] = [r for r in ledger.consistency.modes[mode]
                                          if not {r["small"], r["large"]} & set(names)]


def run_family(family: FamilyConfig, out_dir: str | Path, *, data: str, modes: str | tuple[str, ...] = MODES,
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
    dataset = TokenDataset.open(data)
    given = _check_start_from(family, dataset)
    if dataset.vocab_size > family.members[0].vocab_size:
        raise ConfigError(f"the dataset's tokenizer has {dataset.vocab_size} tokens but the family's "
                          f"vocab_size is {family.members[0].vocab_size}")
    fresh = {**checked.header, "data_fingerprint": dataset.fingerprint()}
    check_same_run(checked.ledger, fresh, out_dir)
    ledger = _started(checked.ledger, fresh, str(data))
    job = _FamilyRun(family, checked.plan, checked.growth, out_dir, str(data), dataset, fixed_data, given,
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
            members = ledger.modes.setdefault(mode, [])
            for i, stage in enumerate(checked.plan.stages):
                if i < len(members) and members[i].done:
                    job.log(f"[{mode}] {stage.name}: done (val loss {loss(members[i].val_loss)})")
                    ledger = published(mode, members[i], False)
                    members = ledger.modes[mode]
                    continue
                _forget(ledger, mode, [m.name for m in members[i:]])
                del members[i:]
                members.append(_build_stage(job, mode, i, members))
                on_main(lambda: write_ledger(out_dir, ledger))
                ledger = published(mode, members[-1], True)
                members = ledger.modes[mode]
    return ledger


@dataclass
class _FamilyRun:
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


def _build_stage(job: _FamilyRun, mode: str, i: int, members: list[MemberEntry]) -> MemberEntry:
    """Train (growing it first in progressive mode) or resume stage `i` of `mode`, publish the
    member (rank 0) and return its ledger entry. members: the mode's finished members before it."""
    plan, growth, out_dir, log = job.plan, job.growth, job.out_dir, job.log
    stage = plan.stages[i]
    tokens = stage.tokens_independent if mode == "independent" else _progressive_tokens(plan, i, members)
    tcfg = stage_train_config(job.family, plan, i, mode, job.data, out_dir, tokens, job.fixed_data)
    run_dir = Path(tcfg.out_dir)
    growth_report = FamilyDirectory(out_dir).growth_report(mode, stage.name)
    resume_from = latest_checkpoint(run_dir)
    model = optimizer = None
    if i == 0 and job.given is not None and resume_from is None:
        model = job.given  # continued from its weights, with fresh AdamW moments
    if mode == "progressive" and i > 0 and resume_from is None:
        log(f"[{mode}] expanding {plan.stages[i - 1].name} -> {stage.name} "
            f"(width {growth.width}, depth {growth.depth}, optimizer {growth.optimizer})")

        def grow():  # rank 0; the others receive the grown model from it in train()
            grown, moments, report = _grow_from(FamilyDirectory(out_dir).run(mode, plan.stages[i - 1].name), tcfg,
                                                job.family.members[i], growth,
                                                _probe_batch(job.dataset, stage.seq_len, growth.probe_tokens),
                                                job.given if i == 1 else None)
            log(str(report))
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(growth_report, json.dumps(report.to_dict(), indent=1) + "\n")
            return grown, moments

        model, optimizer = on_main(grow) or (None, None)
        tcfg = tcfg.replace(model=share(model.cfg if job.main else None))
    elif resume_from is not None:
        # resuming: the checkpoint holds the grown shape (lossless growth changes norm_eps)
        tcfg = tcfg.replace(model=resolve_config(resume_from))
    stop = ConvergenceStop(growth.slope, growth.window) \
        if growth.schedule == "converged" and mode == "progressive" and i < len(plan.stages) - 1 else None
    start = time.perf_counter()
    if i == 0 and job.given is not None and tokens == 0:
        log(f"[{mode}] {stage.name}: given, start_from {job.family.start_from}")
        if job.given_loss is None:  # measured once, as training would measure it: both modes publish it
            job.given_loss = validation_loss(tcfg, job.given, job.dataset)
        result = TrainResult(None, job.given_loss, 0, 0, 0, 0, 0.0, Path(job.family.start_from))
    else:
        log(f"[{mode}] training {stage.name}: {tcfg.max_tokens:,} tokens, max LR {tcfg.max_lr:.3g}")
        result = train(tcfg, model, optimizer, dataset=job.dataset, on_eval=stop)
    member_dir = FamilyDirectory(out_dir).member(mode, stage.name)
    on_main(lambda: _publish(result, member_dir))
    flops_before = members[-1].cum_flops if (members and mode == "progressive") else stage.given_flops
    entry = MemberEntry(
        name=stage.name, dir=str(member_dir), config=resolve_config(result.hf_dir).replace(name=stage.name).to_dict(),
        params=stage.params, nonembedding_params=stage.nonembedding_params, total_params=stage.total_params,
        tokens=result.tokens, planned_tokens=tokens, steps=result.steps, flops=result.flops,
        flops_attn=result.flops_attn, cum_flops=flops_before + result.flops, val_loss=result.val_loss,
        train_loss=result.train_loss, max_lr=tcfg.max_lr, wall_s=result.wall_s,
        session_wall_s=time.perf_counter() - start, spikes=result.spikes, rollbacks=result.rollbacks,
        stopped_early=result.stopped_early, growth=read_json(growth_report) if growth_report.exists() else None,
        done=True,
        given={"dir": job.family.start_from, "tokens": stage.given_tokens, "flops": stage.given_flops}
        if stage.given_tokens else None,
        growth_point={"step": result.steps, "val_loss_slope": stop.last_slope} if stop is not None else None)
    log(f"[{mode}] {stage.name}: val loss {loss(result.val_loss)}, {result.tokens:,} tokens, "
        f"{result.flops:.3g} FLOPs, {result.wall_s:.0f} s")
    return entry


def _check_start_from(family: FamilyConfig, dataset: TokenDataset):
    """The start_from model (float32, for training and growth), after checking that `dataset`
    was tokenized with its tokenizer; None for a family that starts from scratch."""
    if family.start_from is None:
        return None
    path = Path(family.start_from)
    if load_tokenizer(path).fingerprint() != dataset.tokenizer_fingerprint:
        raise ConfigError(f"the dataset {dataset.path} was not tokenized with start_from {path}'s tokenizer; "
                          f"prepare it with `growfam data prepare SOURCE --tokenizer {path}`")
    return load_pretrained(path, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def dataset_dir(family: FamilyConfig, data: str | None, default_dir: Path) -> tuple[str, bool]:
    """The dataset directory to train on, and whether it must be prepared first: `data` if
    given, else the YAML's `data:` section's folder (default_dir unless it names one), to be
    prepared when it holds no dataset yet. Nothing is written."""
    if data is not None:
        return str(data), False
    section = family.data
    path = Path(section.dir) if section.dir else default_dir
    if (path / "index.json").exists():
        return str(path), False
    if section.source is None:
        raise ConfigError("no data: pass --data DIR (see `growfam data prepare`) or give the family "
                          "YAML a data: section with a source")
    return str(path), True


def ensure_dataset(family: FamilyConfig, data: str | None, default_dir: Path, log=print) -> str:
    """The dataset directory of `dataset_dir`, prepared first when it must be (with the
    start_from model's tokenizer when the section names none)."""
    path, todo = dataset_dir(family, data, default_dir)
    if not todo:
        return path
    from growfam.data import prepare

    section = family.data
    # a family given its first member is tokenized with that member's tokenizer
    tokenizer = family.start_from if family.start_from and section.tokenizer == DEFAULT_TOKENIZER else section.tokenizer
    log(f"preparing {section.source} with tokenizer {tokenizer} into {path}")
    prepare(section.source, tokenizer, path, max_tokens=section.max_tokens,
            val_fraction=section.val_fraction)
    return path
