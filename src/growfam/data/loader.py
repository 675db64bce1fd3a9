"""Batches from a split's token array: seeded, resumable training windows (`PackedWindows`) and
deterministic validation windows (`eval_windows`).

Window layout: the stream is cut into windows of `seq_len + 1` tokens starting at multiples of
`seq_len`, window i = tokens[i*seq_len : i*seq_len + seq_len + 1]. Consecutive windows share
one token (the last target of one is the first input of the next), so every token except the
very first is a prediction target exactly once per epoch, and documents are packed across
window edges.

A batch refuses a token id outside the vocabulary when its array carries one (a `SplitTokens`
from `TokenDataset.tokens`; read by duck typing, so this module needs nothing of dataset.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from growfam.errors import GrowfamError


def num_windows(num_tokens: int, seq_len: int) -> int:
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
        self.num_windows = num_windows(len(tokens), seq_len)
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
        return self.gather(self.next_starts(self.batch_size))

    def next_starts(self, count: int) -> np.ndarray:
        """Start offsets (in tokens) of the next `count` windows, the cursor moved past them."""
        starts: list[int] = []
        while len(starts) < count:
            order = self._rank_order()
            take = order[self._position : self._position + count - len(starts)]
            starts.extend(take.tolist())
            self._position += len(take)
            if self._position == len(order):
                self._epoch += 1
                self._position = 0
                self._order = None
        return np.asarray(starts, dtype=np.int64)

    def gather(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows beginning at `starts` as (x, y), int64 [len(starts), seq_len]."""
        return _gather(self.tokens, starts, self.seq_len)

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
        """Continue exactly where `state` was taken (same batches from here on).

        `state` may come from another world size: the ranks of a world of w have consumed the
        first w·position windows of the epoch's order between them, whatever w is, so the
        cursor carries over when both worlds cut the epoch to the same length and this world
        splits the consumed windows evenly; a GrowfamError otherwise."""
        for key in ("seed", "seq_len", "rank", "num_windows", "max_unique_tokens"):
            if state.get(key) != getattr(self, key):
                raise GrowfamError(
                    f"data cursor does not match this data stream: {key} is {state.get(key)!r} "
                    f"in the checkpoint but {getattr(self, key)!r} now"
                )
        position, world = int(state["position"]), int(state["world_size"])
        if world != self.world_size:
            consumed = position * world
            if (self.num_windows // world) * world != self.windows_per_rank * self.world_size \
                    or consumed % self.world_size:
                raise GrowfamError(
                    f"the data cursor of {world} rank(s) cannot be carried over exactly to {self.world_size}: "
                    f"{self.num_windows} windows split into different epochs; resume with {world} rank(s)")
            position = consumed // self.world_size
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
    total = num_windows(len(tokens), seq_len)
    if total == 0:
        raise GrowfamError(f"{len(tokens)} validation tokens hold no window of {seq_len + 1} tokens")
    count = total if max_windows is None else min(total, max_windows)
    index = np.linspace(0, total - 1, count).round().astype(np.int64) if count < total else np.arange(total)
    starts = index * seq_len
    for i in range(0, len(starts), batch_size):
        yield _gather(tokens, starts[i : i + batch_size], seq_len)
