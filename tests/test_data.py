"""Data pipeline: packed windows, preparation, the on-disk dataset, and their errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from growfam.data import PackedWindows, eval_windows
from growfam.errors import GrowfamError


def window_ids(x: torch.Tensor, seq_len: int) -> list[int]:
    """Window index of each row of x, for a stream whose token at position p is p."""
    return [int(row[0]) // seq_len for row in x]


def test_windows_are_shifted_slices_of_the_stream():
    tokens = np.arange(1000, dtype=np.uint16)
    x, y = PackedWindows(tokens, seq_len=16, batch_size=4, seed=0).next_batch()
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 16)
    assert torch.equal(y, x + 1)
    assert all(int(row[0]) % 16 == 0 for row in x)


def test_every_window_once_per_epoch_and_seeded():
    tokens = np.arange(16 * 10 + 1)  # exactly 10 windows
    loader = PackedWindows(tokens, seq_len=16, batch_size=5, seed=3)
    first = window_ids(loader.next_batch()[0], 16) + window_ids(loader.next_batch()[0], 16)
    assert sorted(first) == list(range(10)) and loader.epoch == 1
    second = window_ids(loader.next_batch()[0], 16) + window_ids(loader.next_batch()[0], 16)
    assert sorted(second) == list(range(10)) and second != first  # epoch e uses seed + e
    again = PackedWindows(tokens, seq_len=16, batch_size=5, seed=3)
    assert window_ids(again.next_batch()[0], 16) == first[:5]
    other = PackedWindows(tokens, seq_len=16, batch_size=10, seed=4)
    assert window_ids(other.next_batch()[0], 16) != first


def test_resume_mid_epoch_gives_identical_batches():
    tokens = np.arange(5000)
    run = PackedWindows(tokens, seq_len=8, batch_size=7, seed=1)
    for _ in range(100):  # crosses epoch boundaries (624 windows, 7 per batch)
        run.next_batch()
    state = json.loads(json.dumps(run.state_dict()))
    expected = [run.next_batch() for _ in range(5)]
    resumed = PackedWindows(tokens, seq_len=8, batch_size=7, seed=1)
    resumed.load_state_dict(state)
    assert resumed.epoch == state["epoch"] == 1
    for x, y in expected:
        rx, ry = resumed.next_batch()
        assert torch.equal(rx, x) and torch.equal(ry, y)


def test_resume_refuses_another_stream():
    state = PackedWindows(np.arange(500), seq_len=8, batch_size=2, seed=1).state_dict()
    with pytest.raises(GrowfamError, match="seed"):
        PackedWindows(np.arange(500), seq_len=8, batch_size=2, seed=2).load_state_dict(state)


def test_rank_sharding_partitions_the_epoch():
    tokens = np.arange(4 * 25 + 1)  # 25 windows of 4: 3 ranks take 8 each, one is dropped
    seen = []
    for rank in range(3):
        loader = PackedWindows(tokens, seq_len=4, batch_size=8, seed=5, rank=rank, world_size=3)
        seen.append(set(window_ids(loader.next_batch()[0], 4)))
        assert loader.epoch == 1
    assert all(len(s) == 8 for s in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_fixed_data_repeats_the_first_tokens():
    tokens = np.arange(10_000)
    loader = PackedWindows(tokens, seq_len=10, batch_size=3, seed=0, max_unique_tokens=61)
    assert loader.num_windows == 6
    rows = torch.cat([loader.next_batch()[0] for _ in range(4)])  # 12 windows = 2 epochs
    assert int(rows.max()) < 60 and loader.epoch == 2
    ids = window_ids(rows, 10)
    assert sorted(ids[:6]) == sorted(ids[6:]) == list(range(6))


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(GrowfamError, match="too few"):
        PackedWindows(np.arange(10), seq_len=16, batch_size=1, seed=0)


def test_eval_windows_are_deterministic_and_spread():
    tokens = np.arange(8 * 100 + 1)
    batches = list(eval_windows(tokens, seq_len=8, max_windows=10, batch_size=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    starts = [int(r[0]) for x, _ in batches for r in x]
    assert starts[0] == 0 and starts[-1] == 99 * 8 and len(set(starts)) == 10
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = [int(r[0]) for x, _ in eval_windows(tokens, 8, 10, 4) for r in x]
    assert again == starts
    assert sum(len(x) for x, _ in eval_windows(tokens, 8)) == 100
