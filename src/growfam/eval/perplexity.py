"""Perplexity over a token stream with full context windows at a stride, batched and streamed.

A stream of N tokens has N - 1 targets (stream[1:]). Windows of `window` input tokens start
every `stride` tokens; each scores only the targets no earlier window scored, so every target
is scored once, with at least `window - stride` tokens of context after the first window. The
last window is moved back to end at the stream's end, so every window is full (the same shape:
no padding). Only one batch of logits is held at a time.

Streams: a family dataset's validation split (`split_stream`) or any text / JSONL / Parquet
file or folder (`file_stream`), each beginning with end-of-text so that the first token of
the text is a target too. Bits per byte count the UTF-8 bytes of the text the targets spell
(end-of-text tokens are scored but spell no bytes), so they compare across tokenizers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from growfam.errors import GrowfamError


@dataclass
class Perplexity:
    """Totals of one evaluation: `nll` nats over `tokens` targets spelling `bytes` bytes."""

    tokens: int
    nll: float
    bytes: int | None = None
    window: int | None = None
    stride: int | None = None

    @property
    def nll_per_token(self) -> float:
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_per_token)

    @property
    def bits_per_byte(self) -> float | None:
        return self.nll / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict:
        return {"nll_per_token": self.nll_per_token, "perplexity": self.perplexity,
                "bits_per_byte": self.bits_per_byte, "tokens": self.tokens, "bytes": self.bytes,
                "window": self.window, "stride": self.stride}


def strided_windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored position) of each window over a stream of `num_tokens` tokens.

    A window feeds stream[start : start + window] and predicts stream[start + 1 : start +
    window + 1]; it scores its predictions from position `first` (0-based, in the window) on.
    Every window is full but a lone one over a stream shorter than window + 1 tokens.
    """
    if num_tokens < 2:
        raise GrowfamError(f"a stream of {num_tokens} token(s) has nothing to predict")
    if not 0 < stride <= window:
        raise GrowfamError(f"the stride must be in [1, window={window}], got {stride}")
    last = num_tokens - 1  # the last target's position in the stream
    if last <= window:
        return [(0, 0)]
    windows, scored = [], 0  # `scored`: the last target position already scored
    start = 0
    while scored < last:
        start = min(start, last - window)  # the last window ends at the stream's end
        windows.append((start, scored - start))
        scored = start + window
        start += stride
    return windows


@torch.no_grad()
def score_stream(model: torch.nn.Module, stream: np.ndarray | torch.Tensor, window: int, stride: int | None = None,
               batch_size: int = 8, device: str | torch.device = "cpu", num_bytes: int | None = None) -> Perplexity:
    """Score every target of `stream` (1-D token ids) with `model` (idx [B, T] -> logits
    [B, T, V]); windows as `strided_windows` (stride defaults to window // 2). The NLL is taken
    in at least float32 and summed in float64. num_bytes: the UTF-8 bytes the targets spell, for bits per byte."""
    stride = stride or max(1, window // 2)
    tokens = torch.as_tensor(np.asarray(stream, dtype=np.int64))
    schedule = strided_windows(len(tokens), window, stride)
    length = min(window, len(tokens) - 1)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for i in range(0, len(schedule), batch_size):
        batch = schedule[i:i + batch_size]
        rows = torch.stack([tokens[s:s + length + 1] for s, _ in batch]).to(device)
        logits = model(rows[:, :-1])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, float64 kept
        nll = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="none")
        keep = torch.arange(length, device=device)[None, :] >= torch.tensor([f for _, f in batch], device=device)[:, None]
        total += nll.view(len(batch), length)[keep].double().sum().cpu()
        count += int(keep.sum())
    return Perplexity(tokens=count, nll=float(total), bytes=num_bytes, window=length, stride=min(stride, length))


def text_bytes(tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes of the text `ids` spell, end-of-text tokens left out."""
    ids = np.asarray(ids)
    return len(tokenizer.decode(ids[ids != tokenizer.eos_id].tolist()).encode("utf-8"))


def split_stream(dataset, split: str = "val", max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(end-of-text + the first `max_tokens` tokens of a TokenDataset split, the bytes they spell).

    The ids are checked against the dataset's vocabulary (a corrupt split is one clear error)."""
    from growfam.data import token_rows

    tokens = dataset.tokens(split)
    count = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if count == 0:
        raise GrowfamError(f"{dataset.path}: the {split} split is empty")
    body = token_rows(tokens, np.array([0]), count)[0]
    stream = np.concatenate([[dataset.eos_id], body])
    return stream, text_bytes(dataset.tokenizer(), body)


def file_stream(path: str, tokenizer, max_tokens: int | None = None) -> tuple[np.ndarray, int]:
    """(end-of-text, then each document of a .txt/.jsonl/.parquet file or folder followed by
    end-of-text, the documents' UTF-8 bytes). Reads documents until `max_tokens` are reached;
    the document that reaches it is kept whole."""
    from growfam.data import local_source

    pieces, count, num_bytes = [np.array([tokenizer.eos_id])], 0, 0
    for text in local_source(path):
        ids = tokenizer.encode_documents([text])[0]
        pieces.append(np.array(ids + [tokenizer.eos_id]))
        count += len(ids) + 1
        num_bytes += len(text.encode("utf-8"))
        if max_tokens is not None and count >= max_tokens:
            break
    if count == 0:
        raise GrowfamError(f"{path}: no documents")
    return np.concatenate(pieces).astype(np.int64), num_bytes
