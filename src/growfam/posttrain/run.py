"""`growfam posttrain`: SFT then DPO of every member of a family (or of one model directory)
with identical settings, then MT-Bench answers and scores.

    OUT/
      posttrain.json                the settings, the data's counts and every member's results
      <mode>/<member>/              one member's post-training (just <member>/ for a directory
        sft/  dpo/                  outside a family): TRL's output folders, with checkpoints
        sft/final/                  the SFT model, when DPO follows
        sft.json  dpo.json          a finished phase's results: a rerun skips that phase
        model/                      the post-trained model (Hugging Face, with its chat template)
        result.json                 written last: the member is done and is skipped on a rerun
      mt_bench/model_answer/<id>.jsonl        FastChat answers (id: <mode>-<member>)
      mt_bench/model_judgment/<judge>_single.jsonl

A family's default OUT is FAMILY/posttrain, and the results go into family.json's `posttrain`.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..device import check_device
from ..errors import GrowfamError
from ..family.directory import FamilyDirectory
from ..family.ledger import read_ledger, write_ledger
from ..family.members import Member, resolve_target
from ..io import atomic_write_text, check_folder, read_json
from ..lock import folder_lock
from ..train.parallel import init_distributed, on_main, rank_and_world, share
from ..outputs import kind_of
from . import data, mtbench, trainers
from .chat import with_chat_template
from .config import PosttrainConfig

SETTINGS = "posttrain.json"
RESULT = "result.json"
LONGEST = 2048  # the recipe's sequence length; a member's shorter context wins


@dataclass
class Entry:
    """One member to post-train, its folder under OUT and its answers' model id."""

    member: Member
    key: str

    @property
    def model_id(self) -> str:
        return self.key.replace("/", "-")


def _tokenizer(member: Member):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(member.path))
    except (OSError, ValueError, TypeError):
        raise GrowfamError(f"{member.path}: no tokenizer there (tokenizer.json and tokenizer_config.json); "
                           "post-training needs the member's tokenizer") from None
    return with_chat_template(tokenizer, str(member.path))


@dataclass
class Prepared:
    """Everything checked before any work: members, tokenizers, data split into train and
    held-out, MT-Bench's questions."""

    entries: list[Entry]
    family_dir: Path | None
    out: Path
    sft: tuple[list, list] | None
    dpo: tuple[list, list] | None
    counts: dict
    questions: list | None


def prepare(target: str | Path, cfg: PosttrainConfig, out: str | Path | None, mt_bench: bool,
            names: Sequence[str] = ()) -> Prepared:
    """Check the target, the data and --out, load and split the data; GrowfamError at the
    first problem, before anything is written. `names`: only the members so named (all when
    empty)."""
    resolved = resolve_target(target)
    if names:
        known = list(dict.fromkeys(m.name for m in resolved.members))
        unknown = [n for n in names if n not in known]
        if unknown:
            raise GrowfamError(f"{target} has no member {', '.join(unknown)} (it has {', '.join(known)})")
        resolved.members = [m for m in resolved.members if m.name in names]
    family_dir = resolved.family_dir if FamilyDirectory(target).ledger.is_file() else None
    if out is None:
        if family_dir is None:
            raise GrowfamError("--out is needed for a model directory (a family writes to FAMILY/posttrain)")
        out = FamilyDirectory(family_dir).posttrain
    out = Path(out)
    _check_out(out)
    check_device(cfg.device)
    for member in resolved.members:
        real, src = out.resolve(), member.path.resolve()
        if real == src or src in real.parents or real in src.parents:
            raise GrowfamError(f"--out {out} overlaps the member {member.path}; choose another folder")
        _tokenizer(member)
    entries = [Entry(m, f"{m.mode}/{m.name}" if m.mode else m.name) for m in resolved.members]
    world = trainers.world_size()
    if cfg.batch_size % (cfg.micro_batch_size * world):
        raise GrowfamError(f"batch-size {cfg.batch_size} does not split into micro-batches of {cfg.micro_batch_size} "
                           f"over {world} processes")
    counts: dict = {}
    sft = dpo = None
    if cfg.sft:
        loaded = data.conversations(cfg.sft, cfg.limit)
        sft = data.held_out(loaded.items, cfg.held_out, cfg.seed)
        counts["sft"] = {"source": cfg.sft, "train": len(sft[0]), "held_out": len(sft[1]), "dropped": loaded.dropped}
    if cfg.dpo:
        loaded = data.preferences(cfg.dpo, cfg.limit, cfg.seed)
        dpo = data.held_out(loaded.items, cfg.held_out, cfg.seed)
        counts["dpo"] = {"source": cfg.dpo, "train": len(dpo[0]), "held_out": len(dpo[1]), "dropped": loaded.dropped,
                         "synthetic": cfg.dpo == data.SHAREGPT}
    _check_lengths(entries, sft, dpo, cfg)
    _check_settings(out, cfg)
    return Prepared(entries, family_dir, out, sft, dpo, counts, mtbench.questions() if mt_bench else None)


def max_length(member: Member, cfg: PosttrainConfig) -> int:
    """Tokens per sequence for `member`: --max-length, else its context (at most LONGEST)."""
    return cfg.max_length or min(member.config.max_seq_len, LONGEST)


def _check_lengths(entries: list[Entry], sft: tuple | None, dpo: tuple | None, cfg: PosttrainConfig) -> None:
    """GrowfamError when a phase's training data keeps no reply token within a member's
    max_length (TRL would drop every record), once per tokenizer and length."""
    seen = set()
    for entry in entries:
        tokenizer, length = _tokenizer(entry.member), max_length(entry.member, cfg)
        key = (tokenizer.backend_tokenizer.to_str() if hasattr(tokenizer, "backend_tokenizer") else id(tokenizer), length)
        if key in seen:
            continue
        seen.add(key)
        for name, split, count in (("SFT", sft, trainers.sft_lengths), ("DPO", dpo, trainers.dpo_lengths)):
            if split is not None and trainers.dropped(count(tokenizer, split[0], length)) == len(split[0]):
                raise GrowfamError(f"{entry.member.path}: no {name} record keeps a reply token within max_length "
                                   f"{length} (all {len(split[0])} are cut before the reply); raise --max-length or "
                                   "use shorter conversations")


def _check_out(out: Path) -> None:
    """--out is a new or empty folder, or one a post-training wrote (it resumes there); never
    inside a family directory other than as its posttrain/ folder."""
    check_folder(out, "--out")
    for parent in out.absolute().parents:
        family = FamilyDirectory(parent)
        if family.ledger.is_file() and out.absolute() != family.posttrain.absolute():
            raise GrowfamError(f"--out {out} lies inside the family directory {parent}; posttrain writes there "
                               f"only as {family.posttrain}")
    if out.is_dir() and any(out.iterdir()) and not (out / SETTINGS).is_file():
        kind = kind_of(out) or "a folder growfam posttrain did not make"
        raise GrowfamError(f"--out {out} is {kind}; posttrain writes into a new or empty folder, or resumes "
                           f"its own (it holds {SETTINGS})")


def _check_settings(out: Path, cfg: PosttrainConfig) -> None:
    """A rerun into `out` must repeat the settings that shape the weights."""
    path = out / SETTINGS
    if not path.is_file():
        return
    before = read_json(path).get("settings", {})
    changed = sorted(k for k, v in cfg.training().items() if before.get(k) != v)
    if changed:
        shown = ", ".join(f"{k} {before.get(k)!r} -> {cfg.training()[k]!r}" for k in changed)
        raise GrowfamError(f"{out} holds a post-training with other settings ({shown}); "
                           "repeat them to resume, or choose another --out")


def _member(entry: Entry, job: Prepared, cfg: PosttrainConfig, progress: bool, log) -> dict:
    """Post-train one member (resuming where a killed run stopped); its result."""
    folder = job.out / entry.key
    tokenizer = _tokenizer(entry.member)
    length = max_length(entry.member, cfg)
    result: dict = {"source": str(entry.member.path), "model": str(folder / "model")}
    start = entry.member.path
    phases = [(name, split) for name, split in (("sft", job.sft), ("dpo", job.dpo)) if split is not None]
    for i, (name, (train, held)) in enumerate(phases):
        final = folder / "model" if i == len(phases) - 1 else folder / name / "final"
        done = folder / f"{name}.json"  # written once the phase's model is saved: a rerun skips the phase
        if done.is_file():
            result[name] = read_json(done)
        else:
            log(f"{entry.key}: {name.upper()} on {len(train)} {'conversations' if name == 'sft' else 'pairs'}")
            run = trainers.sft if name == "sft" else trainers.dpo
            result[name] = run(start, tokenizer, train, held, cfg, folder / name, final, length, progress)
            on_main(lambda: atomic_write_text(done, json.dumps(result[name], indent=2) + "\n"))
        start = final
    return result


def _answers(entry: Entry, job: Prepared, cfg: PosttrainConfig, max_new_tokens: int, log) -> dict:
    """MT-Bench answers of a post-trained member, written to OUT/mt_bench/model_answer/."""
    import time

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = job.out / entry.key / "model"
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    log(f"{entry.key}: MT-Bench answers to {len(job.questions)} questions")
    start = time.perf_counter()
    records = mtbench.answer(model, tokenizer, entry.model_id, job.questions, max_new_tokens, cfg.seed)
    path = job.out / "mt_bench" / "model_answer" / f"{entry.model_id}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return {"answers": str(path), "questions": len(records), "max_new_tokens": max_new_tokens,
            "wall_s": round(time.perf_counter() - start, 2)}


def _judge(job: Prepared, results: dict, judge: str, log) -> str:
    """Judge every member's answers with the local model `judge`; the judgment file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(judge).eval()
    tokenizer = AutoTokenizer.from_pretrained(judge)
    if tokenizer.chat_template is None:
        with_chat_template(tokenizer, judge)
    judge_id = Path(judge).name
    judgments = []
    for entry in job.entries:
        answers = [json.loads(line) for line in Path(results[entry.key]["mt_bench"]["answers"]).read_text().splitlines()]
        log(f"{entry.key}: judged by {judge_id}")
        judgments += mtbench.judge(answers, model, tokenizer, judge_id)
    path = job.out / "mt_bench" / "model_judgment" / f"{judge_id}_single.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(j) + "\n" for j in judgments))
    return str(path)


def run_posttrain(target: str | Path, cfg: PosttrainConfig, out: str | Path | None = None, *, mt_bench: bool = False,
                  max_new_tokens: int = 1024, judge: str | None = None, judgments: str | None = None,
                  members: Sequence[str] = (), progress: bool = True, log=print) -> dict:
    """Post-train `target` (a family directory or one model directory; of a family only the
    `members` so named, when given) into `out`; the summary written to OUT/posttrain.json (and
    a family's family.json `posttrain`)."""
    init_distributed()  # under torchrun / accelerate launch: every rank trains, rank 0 alone writes
    if rank_and_world()[0] != 0:
        log = lambda line: None  # noqa: E731
    if judgments is not None:
        mtbench.read_judgments(judgments)  # a malformed file is refused before any work
    if judge is not None:
        if not (Path(judge) / "config.json").is_file():
            raise GrowfamError(f"--judge {judge}: not a model directory (no config.json)")
        _tokenizer(Member(Path(judge).name, None, Path(judge), None))
    job = prepare(target, cfg, out, mt_bench or judge is not None, members)
    with ExitStack() as stack:
        on_main(lambda: stack.enter_context(folder_lock(job.out, "; posttrain writes there")))
        if job.family_dir is not None:
            on_main(lambda: stack.enter_context(
                folder_lock(job.family_dir, "; posttrain records its results in family.json there")))
        earlier = read_json(job.out / SETTINGS).get("members", {}) if (job.out / SETTINGS).is_file() else {}
        summary = {"settings": cfg.training(), "data": job.counts, "members": dict(earlier)}  # --member runs add up
        on_main(lambda: atomic_write_text(job.out / SETTINGS, json.dumps(summary, indent=2) + "\n"))
        for entry in job.entries:
            done = job.out / entry.key / RESULT
            if done.is_file():
                log(f"{entry.key}: done already")
                result = read_json(done)
            else:
                result = _member(entry, job, cfg, progress, log)
            if job.questions is not None and "mt_bench" not in result:
                result["mt_bench"] = share(on_main(lambda: _answers(entry, job, cfg, max_new_tokens, log)))
            on_main(lambda: atomic_write_text(done, json.dumps(result, indent=2) + "\n"))
            summary["members"][entry.key] = result
        if job.family_dir is not None:  # family order, smallest first, whichever --member runs came first
            names = read_ledger(job.family_dir).stage_names
            rank = {key: (names.index(key.rpartition("/")[2]) if key.rpartition("/")[2] in names else len(names),
                          key.partition("/")[0] != "progressive") for key in summary["members"]}
            summary["members"] = dict(sorted(summary["members"].items(), key=lambda kv: rank[kv[0]]))
        if rank_and_world()[0] != 0:
            return summary  # rank 0 judges and records; the others are done
        judged = _judge(job, summary["members"], judge, log) if judge is not None else judgments
        if judged is not None:
            scores = mtbench.read_judgments(judged)
            summary["judgments"] = judged
            for entry in job.entries:
                summary["members"][entry.key].setdefault("mt_bench", {}).update(
                    scores.get(entry.model_id, {"score": None, "judged": 0, "missing": 0}))
        atomic_write_text(job.out / SETTINGS, json.dumps(summary, indent=2) + "\n")
        if job.family_dir is not None:
            ledger = read_ledger(job.family_dir)
            ledger.extra["posttrain"] = {"out": str(job.out), **summary}
            write_ledger(job.family_dir, ledger)
    return summary
