"""Training data: document sources, one-time tokenisation into token files, and packed windows.

Pipeline: `open_source` gives documents (the embedded Python-stdlib corpus, local
.txt/.jsonl/.parquet files, or a streamed Hugging Face dataset); `prepare` tokenises them once
into a self-contained dataset directory; `TokenDataset.open` memory-maps it; `PackedWindows`
turns a split's token array into seeded, resumable batches and `eval_windows` into validation
batches.

Dataset directory (written by `growfam.io.atomic_directory`: an old one is replaced only by a
complete new one):

    index.json         format, tokenizer {name, fingerprint, vocab_size, eos_id}, dtype,
                       splits {train|val: {file, tokens, documents}}, val_fraction, source
    train/tokens.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids: the
    val/tokens.bin     split's documents in source order, each followed by eos_id
    tokenizer/         the tokenizer as a Hugging Face directory

A document goes to the validation split when a hash of its text falls below val_fraction, so
the split is stable under reordering and a duplicated document never straddles both splits.

Window layout: the stream is cut into windows of `seq_len + 1` tokens starting at multiples of
`seq_len`, window i = tokens[i*seq_len : i*seq_len + seq_len + 1]. Consecutive windows share
one token (the last target of one is the first input of the next), so every token except the
very first is a prediction target exactly once per epoch, and documents are packed across
window edges.

Reading checks what is cheap to check: `TokenDataset.open` validates index.json against the files,
and the batches of a split (`TokenDataset.tokens`) refuse a token id outside the vocabulary, so a
corrupt file is one clear error rather than an embedding IndexError (or a CUDA device assert).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from growfam.errors import ConfigError, GrowfamError, as_int, as_number, read_json
from growfam.io import atomic_directory, check_output, remove_stale_temporaries
from growfam.tokenizer import MIN_TRAINED_VOCAB, Tokenizer, load_tokenizer, train_bpe

FORMAT = "growfam-tokens/1"
SPLITS = ("train", "val")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
CHUNK_CHARS = 4_000_000  # text tokenised per batch: big enough to keep every thread busy
BPE_TRAIN_MAX_CHARS = 100_000_000  # text a train:VOCAB tokenizer learns from, at most
# Distribution-dependent parts of the stdlib tree (Debian ships the tests separately), left out
# so the embedded corpus is the same on every machine with the same Python version.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A re-iterable stream of documents (non-empty strings) and a one-line description.

    `path` is the file or folder of a local source (None otherwise): an output must not overlap it.
    """

    description: str
    documents: Callable[[], Iterator[str]]
    path: Path | None = None

    def __iter__(self) -> Iterator[str]:
        return (doc for doc in self.documents() if doc)


def embedded_source() -> Source:
    """The Python standard library's documentation topics (pydoc_data) and .py sources.

    Exists on any machine that runs growfam, offline. Order: the doc topics by name, then the
    source files by relative path (pydoc_data/topics.py itself excluded: it is the topics).
    """
    root = Path(sysconfig.get_paths()["stdlib"])

    def documents() -> Iterator[str]:
        from pydoc_data.topics import topics

        for name in sorted(topics):
            yield topics[name]
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if _STDLIB_SKIP.isdisjoint(rel.parts) and rel.as_posix() != "pydoc_data/topics.py":
                yield path.read_bytes().decode("utf-8", errors="replace")

    version = ".".join(map(str, sys.version_info[:3]))
    return Source(f"embedded: Python {version} standard library sources and pydoc topics", documents)


def _read_txt(path: Path, text_field: str) -> Iterator[str]:
    yield path.read_bytes().decode("utf-8", errors="replace")  # one file, one document


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise GrowfamError(f"{path}:{number}: malformed JSON: {err}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise GrowfamError(f"{path}:{number}: no string field {text_field!r}")
            yield record[text_field]


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GrowfamError(f"{path}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.ParquetFile(path)
    if text_field not in table.schema_arrow.names:
        raise GrowfamError(f"{path}: no column {text_field!r} (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(columns=[text_field]):
        yield from (text for text in batch.column(0).to_pylist() if isinstance(text, str))


_READERS = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


def local_source(path: str | Path, text_field: str = "text") -> Source:
    """A .txt (one document per file), .jsonl (one per line) or .parquet file, or a folder of them.

    Folders are searched recursively, files taken in sorted path order.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise GrowfamError(f"{path}: no {'/'.join(LOCAL_SUFFIXES)} files in this folder")
    elif path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise GrowfamError(f"{path}: unsupported file type (expected {', '.join(LOCAL_SUFFIXES)})")
        files = [path]
    else:
        raise GrowfamError(f"{path}: no such file or folder")

    def documents() -> Iterator[str]:
        for file in files:
            yield from _READERS[file.suffix](file, text_field)

    description = f"local: {path.resolve()} ({len(files)} file(s), field {text_field!r})"
    return Source(description, documents, path.resolve())


def hf_source(name: str, config: str | None = None, split: str = "train", text_field: str = "text") -> Source:
    """A Hugging Face dataset streamed with `datasets` (installed with growfam's [hub] extra)."""
    try:
        import datasets
    except ImportError:
        raise GrowfamError(
            f"hf:{name}: Hugging Face datasets need the `datasets` package (pip install 'growfam[hub]')"
        ) from None

    def documents() -> Iterator[str]:
        try:
            stream = datasets.load_dataset(name, config, split=split, streaming=True)
            for record in stream:
                yield record[text_field]
        except KeyError:
            raise GrowfamError(f"hf:{name}: records have no field {text_field!r}") from None
        except (OSError, ValueError, ConnectionError) as err:
            raise GrowfamError(f"hf:{name}: cannot stream the dataset: {err}") from None

    return Source(f"hf: {name} config={config} split={split} field={text_field!r}", documents)


SourceSpec = str | Path | dict[str, Any] | list[str] | tuple[str, ...] | Source


def open_source(spec: SourceSpec, *, text_field: str = "text", max_documents: int | None = None) -> Source:
    """Resolve a source spec to a `Source`, optionally capped at `max_documents` documents.

    spec: "embedded"; "hf:NAME[:CONFIG[:SPLIT]]"; a file or folder path; a list of documents
    (in memory); or a dict with one of the keys "embedded" (true), "hf" (name, with optional
    "config", "split") or "path", and optional "text_field" and "max_documents".
    """
    if isinstance(spec, Source):
        source = spec
    elif isinstance(spec, (list, tuple)):
        docs = list(spec)
        source = Source(f"memory: {len(docs)} documents", lambda: iter(docs))
    elif isinstance(spec, dict):
        spec = dict(spec)
        text_field = spec.pop("text_field", text_field)
        max_documents = spec.pop("max_documents", max_documents)
        if spec.get("hf"):
            source = hf_source(spec["hf"], spec.get("config"), spec.get("split", "train"), text_field)
        elif spec.get("path"):
            source = local_source(spec["path"], text_field)
        elif spec.get("embedded"):
            source = embedded_source()
        else:
            raise GrowfamError(f"data source {spec}: expected one of the keys 'embedded', 'hf', 'path'")
    elif str(spec) == "embedded":
        source = embedded_source()
    elif str(spec).startswith("hf:"):
        name, config, split = (str(spec)[3:].split(":") + [None, None])[:3]
        if not name:
            raise GrowfamError(f"{spec}: expected hf:NAME[:CONFIG[:SPLIT]]")
        source = hf_source(name, config or None, split or "train", text_field)
    else:
        source = local_source(spec, text_field)
    if max_documents is None:
        return source
    return Source(
        f"{source.description}, first {max_documents} documents",
        lambda: islice(iter(source), max_documents),
        source.path,
    )


# --------------------------------------------------------------------------------------------
# Preparation
# --------------------------------------------------------------------------------------------


def in_val_split(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the validation split: its text's hash, read as a number in
    [0, 1), is below val_fraction. Deterministic across runs, machines and document orders."""
    digest = hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < val_fraction


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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


def prepare(
    source: SourceSpec,
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.005,
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
    check_output(out, force=overwrite, source=source.path, what="dataset directory")
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
            index = {
                "format": FORMAT,
                "tokenizer": {
                    "name": tokenizer.name,
                    "fingerprint": tokenizer.fingerprint(),
                    "vocab_size": tokenizer.vocab_size,
                    "eos_id": tokenizer.eos_id,
                },
                "dtype": token_dtype(tokenizer.vocab_size).name,
                "splits": splits,
                "val_fraction": val_fraction,
                "max_tokens": max_tokens,
                "source": source.description,
            }
            (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
        except OSError as err:  # full disk, unreadable input file: name the file, not just the output
            raise GrowfamError(f"preparing {out} failed: {err}") from None
        TokenDataset.open(tmp)  # what would be published must read back whole

    remove_stale_temporaries(out.parent)  # what an interrupted prepare left behind
    atomic_directory(out, write)
    if splits["val"]["tokens"] == 0:
        print(f"growfam: warning: {out} has an empty validation split; raise val_fraction", file=sys.stderr)
    return TokenDataset.open(out)


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


# --------------------------------------------------------------------------------------------
# Reading a prepared dataset
# --------------------------------------------------------------------------------------------


class SplitTokens(np.memmap):
    """A split's token file, memory-mapped read-only, that knows its dataset and vocabulary, so
    `PackedWindows` and `eval_windows` refuse the ids of a corrupt file batch by batch. Slices
    (a `max_unique_tokens` cap) keep both."""

    origin: str = "token array"
    vocab_size: int | None = None

    def __array_finalize__(self, obj: Any) -> None:
        super().__array_finalize__(obj)
        self.origin = getattr(obj, "origin", SplitTokens.origin)
        self.vocab_size = getattr(obj, "vocab_size", None)


class TokenDataset:
    """A prepared dataset directory, memory-mapped read-only. Use `TokenDataset.open(dir)`."""

    def __init__(self, path: Path, index: dict[str, Any]) -> None:
        self.path = path
        self.index = index
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = index["tokenizer"]["vocab_size"]
        self.eos_id: int = index["tokenizer"]["eos_id"]
        self.tokenizer_fingerprint: str = index["tokenizer"]["fingerprint"]

    @classmethod
    def open(cls, path: str | Path) -> TokenDataset:
        """Open and validate a directory written by `prepare`; GrowfamError if it is unusable."""
        path = Path(path)
        if not (path / "index.json").is_file():
            raise GrowfamError(f"{path}: not a prepared dataset (no index.json); run `growfam data prepare`")
        index = read_json(path / "index.json")
        _check_index(path, index)
        return cls(path, index)

    def num_tokens(self, split: str) -> int:
        """Tokens in `split` ("train" or "val"), eos separators included."""
        return int(self._entry(split)["tokens"])

    def num_documents(self, split: str) -> int:
        return int(self._entry(split)["documents"])

    def tokens(self, split: str) -> np.ndarray:
        """The split's token stream, 1-D, memory-mapped read-only (dtype uint16 or uint32)."""
        if self.num_tokens(split) == 0:
            return np.empty(0, dtype=self.dtype)  # mmap cannot map an empty file
        tokens = SplitTokens(self.path / self._entry(split)["file"], dtype=self.dtype, mode="r")
        tokens.origin = f"{self.path}: {split} split"
        tokens.vocab_size = self.vocab_size
        return tokens

    def tokenizer(self) -> Tokenizer:
        """The tokenizer saved with the dataset (checked against the index's fingerprint)."""
        tok = load_tokenizer(self.path / "tokenizer")
        if tok.fingerprint() != self.tokenizer_fingerprint:
            raise GrowfamError(f"{self.path}: the saved tokenizer does not match index.json (corrupt dataset)")
        return tok

    def fingerprint(self) -> str:
        """sha256 of index.json's content: tokenizer, split sizes, source and options.

        Two preparations of the same source with the same tokenizer and options match; any other
        difference shows. (Token contents are not hashed: that would read the whole dataset.)
        """
        return hashlib.sha256(json.dumps(self.index, sort_keys=True).encode()).hexdigest()

    @property
    def source(self) -> str:
        return self.index["source"]

    def _entry(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise GrowfamError(f"unknown split {split!r} (expected one of {SPLITS})")
        return self.index["splits"][split]

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, train={self.num_tokens('train')}, "
            f"val={self.num_tokens('val')}, vocab={self.vocab_size}, dtype={self.dtype.name})"
        )


def _check_index(path: Path, index: Any) -> None:
    """GrowfamError naming the first problem of a dataset's index.json or token files.

    Checks the fields' presence and types, the dtype, and each token file's size against its
    count; not the token values (that would read the whole dataset: batches check those).
    """
    corrupt = f"{path}: corrupt index.json"
    if not isinstance(index, dict):
        raise GrowfamError(f"{corrupt}: not a JSON object")

    def field(*keys: str) -> Any:
        value = index
        for depth, key in enumerate(keys, 1):
            if not isinstance(value, dict) or key not in value:
                raise GrowfamError(f"{corrupt}: missing {'.'.join(keys[:depth])!r}")
            value = value[key]
        return value

    if field("format") != FORMAT:
        raise GrowfamError(f"{path}: unknown dataset format {field('format')!r} (expected {FORMAT})")
    field("source")  # read by the properties of TokenDataset
    field("tokenizer", "fingerprint")
    vocab = as_int(field("tokenizer", "vocab_size"), f"{corrupt}: tokenizer.vocab_size", at_least=1)
    eos = as_int(field("tokenizer", "eos_id"), f"{corrupt}: tokenizer.eos_id")
    if eos >= vocab:
        raise GrowfamError(f"{corrupt}: eos_id {eos} is outside the vocabulary of {vocab}")
    if field("dtype") not in ("uint16", "uint32"):
        raise GrowfamError(f"{corrupt}: dtype {field('dtype')!r} is not uint16 or uint32")
    dtype = np.dtype(field("dtype"))
    if dtype != token_dtype(vocab):
        raise GrowfamError(f"{path}: dtype {dtype} does not fit the vocabulary size")
    for split in SPLITS:
        name = field("splits", split, "file")
        tokens = as_int(field("splits", split, "tokens"), f"{corrupt}: splits.{split}.tokens")
        as_int(field("splits", split, "documents"), f"{corrupt}: splits.{split}.documents")
        if not isinstance(name, str) or not (path / name).resolve().is_relative_to(path.resolve()):
            raise GrowfamError(f"{corrupt}: splits.{split}.file {name!r} is outside the dataset")
        size = (path / name).stat().st_size if (path / name).is_file() else None
        if size is not None and size % dtype.itemsize:
            raise GrowfamError(f"{path}: {name} is not a whole number of {dtype} tokens "
                               f"({size} bytes; corrupt dataset)")
        if size != tokens * dtype.itemsize:
            raise GrowfamError(f"{path}: {name} is missing or not {tokens * dtype.itemsize} bytes "
                               "(corrupt dataset)")


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def _num_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len+1 tokens at stride seq_len that fit in `num_tokens` tokens."""
    return max(0, (num_tokens - 1) // seq_len)


def token_rows(tokens: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """Rows `tokens[s : s + length]` for s in `starts`, as an int64 array [len(starts), length].

    GrowfamError for an id outside the vocabulary of a `SplitTokens` array (a corrupt dataset).
    """
    # One contiguous slice per row: cheap on a memmap, unlike fancy indexing of the whole array.
    rows = np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])
    vocab_size = getattr(tokens, "vocab_size", None)
    if vocab_size is not None and rows.max() >= vocab_size:  # one max per batch: cheap
        row, column = np.unravel_index(rows.argmax(), rows.shape)
        raise GrowfamError(
            f"{tokens.origin}: token id {rows[row, column]} at position {starts[row] + column} is "
            f"outside the vocabulary of {vocab_size} (corrupt dataset; prepare it again)"
        )
    return rows


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows beginning at `starts` as (x, y), int64 tensors [len(starts), seq_len]."""
    windows = torch.from_numpy(token_rows(tokens, starts, seq_len + 1))
    return windows[:, :-1], windows[:, 1:]


class PackedWindows:
    """Seeded, resumable batches of packed windows over a 1-D token array.

    Each epoch visits every window once in the order `np.random.default_rng(seed + epoch)
    .permutation(num_windows)`. With `world_size` > 1 the permutation is cut to a multiple of
    world_size (so all ranks take the same number of steps) and rank r takes every
    world_size-th entry starting at r: the ranks partition the epoch's windows. A batch that
    reaches the end of an epoch continues with the next epoch's order.

    `max_unique_tokens` is the paper's fixed-data mode: only the first N tokens are used, so
    once their windows are exhausted training repeats them (the next epoch).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        max_unique_tokens: int | None = None,
    ) -> None:
        if tokens.ndim != 1:
            raise GrowfamError(f"token array must be 1-D, got shape {tuple(tokens.shape)}")
        if seq_len <= 0 or batch_size <= 0:
            raise GrowfamError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise GrowfamError(f"rank {rank} is outside world size {world_size}")
        if max_unique_tokens is not None:
            if max_unique_tokens <= 0:
                raise GrowfamError(f"max_unique_tokens must be positive, got {max_unique_tokens}")
            tokens = tokens[:max_unique_tokens]
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.max_unique_tokens = max_unique_tokens
        self.num_windows = _num_windows(len(tokens), seq_len)
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank == 0:
            raise GrowfamError(
                f"{len(tokens)} tokens hold {self.num_windows} windows of {seq_len + 1} tokens, "
                f"too few for {world_size} rank(s); use more data or a shorter sequence"
            )
        self._epoch = 0
        self._position = 0  # windows of this rank's share already consumed in the current epoch
        self._order: np.ndarray | None = None

    @property
    def epoch(self) -> int:
        """Completed passes over the (capped) data: 0 during the first pass."""
        return self._epoch

    @property
    def tokens_per_epoch(self) -> int:
        """Target tokens one rank sees per epoch."""
        return self.windows_per_rank * self.seq_len

    def _rank_order(self) -> np.ndarray:
        """Start offsets (in tokens) of this rank's windows for the current epoch, in order."""
        if self._order is None:
            perm = np.random.default_rng(self.seed + self._epoch).permutation(self.num_windows)
            share = perm[: self.windows_per_rank * self.world_size][self.rank :: self.world_size]
            self._order = share * self.seq_len
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y): int64 tensors [batch_size, seq_len], y[:, t] = x[:, t + 1] of the stream."""
        starts = []
        while len(starts) < self.batch_size:
            order = self._rank_order()
            take = order[self._position : self._position + self.batch_size - len(starts)]
            starts.extend(take.tolist())
            self._position += len(take)
            if self._position == len(order):
                self._epoch += 1
                self._position = 0
                self._order = None
        return _gather(self.tokens, np.asarray(starts), self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable cursor; the shape fields let `load_state_dict` refuse another stream."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_windows": self.num_windows,
            "max_unique_tokens": self.max_unique_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken (same batches from here on)."""
        for key in ("seed", "seq_len", "rank", "world_size", "num_windows", "max_unique_tokens"):
            if state.get(key) != getattr(self, key):
                raise GrowfamError(
                    f"data cursor does not match this data stream: {key} is {state.get(key)!r} "
                    f"in the checkpoint but {getattr(self, key)!r} now"
                )
        position = int(state["position"])
        if not 0 <= position < self.windows_per_rank:
            raise GrowfamError(f"data cursor position {position} is outside 0..{self.windows_per_rank - 1}")
        # batch_size may differ (a changed micro-batch): the cursor counts windows, not batches.
        self._epoch = int(state["epoch"])
        self._position = position
        self._order = None


def eval_windows(
    tokens: np.ndarray, seq_len: int, max_windows: int | None = None, batch_size: int = 8
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation batches (x, y), int64 [<=batch_size, seq_len].

    Uses up to `max_windows` windows (all when None) spread evenly over the whole array, so a
    capped evaluation still samples the entire validation split; the same arguments always give
    the same batches. The last batch may be smaller.
    """
    total = _num_windows(len(tokens), seq_len)
    if total == 0:
        raise GrowfamError(f"{len(tokens)} validation tokens hold no window of {seq_len + 1} tokens")
    count = total if max_windows is None else min(total, max_windows)
    index = np.linspace(0, total - 1, count).round().astype(np.int64) if count < total else np.arange(total)
    starts = index * seq_len
    for i in range(0, len(starts), batch_size):
        yield _gather(tokens, starts[i : i + batch_size], seq_len)
