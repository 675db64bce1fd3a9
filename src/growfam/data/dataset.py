"""Reading a prepared dataset directory: `TokenDataset.open` memory-maps what `prepare` wrote.

Dataset directory (finished by `prepare` or `merge`: an old one is replaced only by a complete
new one):

    index.json           format, tokenizer {name, fingerprint, vocab_size, eos_id}, dtype,
                         splits {train|val: {tokens, documents, shards: [{file, tokens, documents}]}},
                         val_fraction, shard_tokens, source, units
    train/UNIT-PIECE.bin raw little-endian uint16 (vocab <= 65536) or uint32 token ids: the
    val/UNIT-PIECE.bin   split's documents in source order, each followed by eos_id, cut into
                         shards at document ends; a split's stream is its shards in index order
    tokenizer/           the tokenizer as a Hugging Face directory

Format growfam-tokens/1 (before shards) has one file per split, splits {train|val: {file, tokens,
documents}}; it is read as a split of one shard.

Reading checks what is cheap to check: `TokenDataset.open` validates index.json against the files,
and the batches of a split (`TokenDataset.tokens`) refuse a token id outside the vocabulary, so a
corrupt file is one clear error rather than an embedding IndexError (or a CUDA device assert).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from growfam.data.tokenizer import Tokenizer, load_tokenizer
from growfam.checks import as_int
from growfam.errors import GrowfamError
from growfam.io import read_json

FORMAT = "growfam-tokens/2"
#: Formats this version reads: the sharded one and the single-file one before it.
READABLE_FORMATS = (FORMAT, "growfam-tokens/1")
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


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


class ShardedTokens:
    """A split kept in several shard files, read as one 1-D token stream without copying.

    Supports what the loaders use of an array: len, an int index, a step-1 slice (a view; one
    inside a shard is that shard's memmap slice), np.asarray and tolist (these copy the view),
    dtype/ndim/shape, and a SplitTokens' origin and vocab_size."""

    ndim = 1

    def __init__(self, shards: list[np.ndarray], start: int = 0, stop: int | None = None) -> None:
        self.shards = shards
        self.ends = np.cumsum([len(s) for s in shards])
        self.start = start
        self.stop = int(self.ends[-1]) if stop is None else stop
        self.origin = getattr(shards[0], "origin", SplitTokens.origin)
        self.vocab_size = getattr(shards[0], "vocab_size", None)

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            begin, end, step = key.indices(len(self))
            if step != 1:
                raise IndexError("a sharded token stream takes slices of step 1 only")
            begin, end = self.start + begin, self.start + max(begin, end)
            shard = int(np.searchsorted(self.ends, begin, side="right"))
            first = 0 if shard == 0 else int(self.ends[shard - 1])
            if shard < len(self.shards) and end <= self.ends[shard]:
                return self.shards[shard][begin - first : end - first]
            return ShardedTokens(self.shards, begin, end)
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} is outside a stream of {len(self)} tokens")
        shard = int(np.searchsorted(self.ends, self.start + index, side="right"))
        return self.shards[shard][self.start + index - (0 if shard == 0 else int(self.ends[shard - 1]))]

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        first = int(np.searchsorted(self.ends, self.start, side="right"))
        pieces, position = [], self.start
        for shard in range(first, len(self.shards)):
            if position >= self.stop:
                break
            offset = 0 if shard == 0 else int(self.ends[shard - 1])
            pieces.append(self.shards[shard][position - offset : min(self.stop, int(self.ends[shard])) - offset])
            position = int(self.ends[shard])
        out = np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)
        return out if dtype is None else out.astype(dtype, copy=False)

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()


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

    def tokenized_with(self, path: str | Path) -> bool:
        """Whether this dataset was tokenized with the tokenizer saved at `path` (a model or a
        tokenizer directory): the same fingerprint. A GrowfamError when `path` holds none."""
        return load_tokenizer(path).fingerprint() == self.tokenizer_fingerprint

    def num_tokens(self, split: str) -> int:
        """Tokens in `split` ("train" or "val"), eos separators included."""
        return int(self._entry(split)["tokens"])

    def num_documents(self, split: str) -> int:
        return int(self._entry(split)["documents"])

    def shards(self, split: str) -> list[dict[str, Any]]:
        """The split's shards in stream order: {file, tokens, documents} each."""
        return split_shards(self._entry(split))

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The split's token stream, 1-D, memory-mapped read-only (dtype uint16 or uint32): a
        SplitTokens for a split in one file, a ShardedTokens over several."""
        maps = []
        for shard in self.shards(split):
            if shard["tokens"] == 0:
                continue  # mmap cannot map an empty file
            tokens = SplitTokens(self.path / shard["file"], dtype=self.dtype, mode="r")
            tokens.origin = f"{self.path}: {split} split"  # positions in errors are the split's
            tokens.vocab_size = self.vocab_size
            maps.append(tokens)
        if not maps:
            return np.empty(0, dtype=self.dtype)
        return maps[0] if len(maps) == 1 else ShardedTokens(maps)

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


def split_shards(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The shards of an index's split entry: its `shards`, or its one `file` (format 1)."""
    if "shards" in entry:
        return entry["shards"]
    return [{"file": entry["file"], "tokens": entry["tokens"], "documents": entry["documents"]}]


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

    if field("format") not in READABLE_FORMATS:
        raise GrowfamError(f"{path}: unknown dataset format {field('format')!r} (this version reads "
                           f"{', '.join(READABLE_FORMATS)}; a newer growfam wrote it?)")
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
    sharded = field("format") == FORMAT
    for split in SPLITS:
        tokens = as_int(field("splits", split, "tokens"), f"{corrupt}: splits.{split}.tokens")
        documents = as_int(field("splits", split, "documents"), f"{corrupt}: splits.{split}.documents")
        shards = field("splits", split, "shards") if sharded else split_shards(field("splits", split))
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise GrowfamError(f"{corrupt}: splits.{split}.shards is not a list of shards")
        for number, shard in enumerate(shards):
            _check_shard(path, f"{corrupt}: splits.{split}.shards[{number}]", shard, dtype)
        if sum(s["tokens"] for s in shards) != tokens or sum(s["documents"] for s in shards) != documents:
            raise GrowfamError(f"{corrupt}: the {split} split's shards do not add up to its "
                               f"{tokens} tokens and {documents} documents")


def _check_shard(path: Path, where: str, shard: dict[str, Any], dtype: np.dtype) -> None:
    """GrowfamError unless `shard` names a file inside the dataset of exactly its tokens' size."""
    for key in ("file", "tokens", "documents"):
        if key not in shard:
            raise GrowfamError(f"{where}: missing {key!r}")
    name = shard["file"]
    tokens = as_int(shard["tokens"], f"{where}.tokens", at_least=0)
    as_int(shard["documents"], f"{where}.documents", at_least=0)
    if not isinstance(name, str) or not (path / name).resolve().is_relative_to(path.resolve()):
        raise GrowfamError(f"{where}.file {name!r} is outside the dataset")
    if tokens == 0 and not (path / name).exists():
        return  # an empty shard may have no file
    size = (path / name).stat().st_size if (path / name).is_file() else None
    if size is not None and size % dtype.itemsize:
        raise GrowfamError(f"{path}: {name} is not a whole number of {dtype} tokens "
                           f"({size} bytes; corrupt dataset)")
    if size != tokens * dtype.itemsize:
        raise GrowfamError(f"{path}: {name} is missing or not {tokens * dtype.itemsize} bytes "
                           "(corrupt dataset)")
