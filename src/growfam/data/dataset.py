"""Reading a prepared dataset directory: `TokenDataset.open` memory-maps what `prepare` wrote.

Dataset directory (written by `growfam.io.atomic_directory`: an old one is replaced only by a
complete new one):

    index.json         format, tokenizer {name, fingerprint, vocab_size, eos_id}, dtype,
                       splits {train|val: {file, tokens, documents}}, val_fraction, source
    train/tokens.bin   raw little-endian uint16 (vocab <= 65536) or uint32 token ids: the
    val/tokens.bin     split's documents in source order, each followed by eos_id
    tokenizer/         the tokenizer as a Hugging Face directory

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

FORMAT = "growfam-tokens/1"
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
