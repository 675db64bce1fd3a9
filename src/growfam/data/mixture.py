"""Mixtures: several prepared datasets trained on in proportion to their weights.

A mixture is given inline (`data: {mix: [{dir: A, weight: 0.7}, {dir: B, weight: 0.3}]}` in a
train config) or as a folder holding mixture.json (what a family's `data: {mix: ...}` section
writes), so that whatever takes a dataset directory takes a mixture too (`open_dataset`).

Training windows (`MixedWindows`): window k of a rank comes from the component i with the
largest w_i·(k+1) − n_i, n_i its windows so far (ties to the first): a fixed interleave in which
every component's count stays within one window of w_i·k at every k, the same on every rank;
within a component, windows come in its own seeded epoch order (`PackedWindows`). The cursor
(each component's and the counts n_i) resumes exactly, on another number of ranks too when the
components' epochs split evenly over both (as PackedWindows' cursor does). Validation and
evaluation read `tokens(split)`: the components' streams cut in proportion to the weights (as
long as the shortest allows) and joined, so evenly spread windows sample them in proportion.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from growfam.data.dataset import ShardedTokens, TokenDataset
from growfam.data.loader import PackedWindows
from growfam.checks import as_number
from growfam.errors import ConfigError, GrowfamError
from growfam.io import atomic_write_text, read_json

MIXTURE_FILE = "mixture.json"
MIXTURE_FORMAT = "growfam-mixture/1"
#: Seed offset between components, so two of the same size do not share an epoch order.
COMPONENT_SEED_STRIDE = 1_000_003


def parse_mix(spec: Any, where: str = "data.mix") -> list[tuple[str, float]]:
    """[(dir, weight)] of a mix list [{dir, weight}, ...], weights normalised to sum 1;
    ConfigError for anything else."""
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where} must be a non-empty list of {{dir: DATASET, weight: W}}")
    mix = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or set(item) != {"dir", "weight"} or not isinstance(item["dir"], str):
            raise ConfigError(f"{where}[{i}] must be {{dir: DATASET, weight: W}}, got {item!r}")
        weight = as_number(item["weight"], f"{where}[{i}].weight")
        if not weight > 0:
            raise ConfigError(f"{where}[{i}].weight must be positive, got {weight}")
        mix.append((item["dir"], weight))
    if len({d for d, _ in mix}) < len(mix):
        raise ConfigError(f"{where} names a dataset twice; give it one weight")
    total = sum(w for _, w in mix)
    return [(d, w / total) for d, w in mix]


class Mixture:
    """Prepared datasets (same tokenizer) and their weights (summing to 1); reads like a
    TokenDataset for validation and evaluation, and makes `MixedWindows` for training."""

    def __init__(self, mix: list[tuple[str, float]], path: Path | None = None) -> None:
        self.components = [TokenDataset.open(d) for d, _ in mix]
        self.weights = [w for _, w in mix]
        first = self.components[0]
        for ds in self.components[1:]:
            if ds.tokenizer_fingerprint != first.tokenizer_fingerprint:
                raise ConfigError(f"the mixture's datasets {first.path} and {ds.path} were tokenized with different "
                                  "tokenizers; prepare them with the same --tokenizer")
        self.path = path if path is not None else first.path
        self.vocab_size = first.vocab_size
        self.eos_id = first.eos_id
        self.tokenizer_fingerprint = first.tokenizer_fingerprint
        self.dtype = first.dtype

    def spec(self) -> list[dict[str, Any]]:
        """The mix as JSON: [{dir (absolute), weight}]."""
        return [{"dir": str(ds.path.resolve()), "weight": w} for ds, w in zip(self.components, self.weights)]

    def fingerprint(self) -> str:
        """sha256 of the components' fingerprints and weights."""
        parts = [[ds.fingerprint(), w] for ds, w in zip(self.components, self.weights)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def tokenizer(self):
        return self.components[0].tokenizer()

    def tokenized_with(self, path: str | Path) -> bool:
        return self.components[0].tokenized_with(path)

    @property
    def source(self) -> str:
        return "mixture: " + ", ".join(f"{w:.3g} {ds.source}" for ds, w in zip(self.components, self.weights))

    def num_tokens(self, split: str) -> int:
        return len(self.tokens(split))

    def tokens(self, split: str) -> np.ndarray | ShardedTokens:
        """The components' `split` streams, each cut to weight·L tokens (L as large as the
        shortest allows), joined: 1-D."""
        streams = [ds.tokens(split) for ds in self.components]
        scale = min(len(s) / w for s, w in zip(streams, self.weights))
        cut = [s[: int(math.floor(scale * w))] for s, w in zip(streams, self.weights)]
        parts = [c for c in cut if len(c)]
        if not parts:
            return np.empty(0, dtype=self.dtype)
        return parts[0] if len(parts) == 1 else ShardedTokens(parts)

    def windows(self, seq_len: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                max_unique_tokens: int | None = None) -> MixedWindows:
        if max_unique_tokens is not None:
            raise ConfigError("max_unique_tokens (fixed-data mode) does not apply to a mixture")
        parts = [PackedWindows(ds.tokens("train"), seq_len, batch_size, seed + COMPONENT_SEED_STRIDE * i,
                               rank=rank, world_size=world_size) for i, ds in enumerate(self.components)]
        return MixedWindows(parts, self.weights, batch_size)


class MixedWindows:
    """Training batches drawn from several `PackedWindows` in proportion to `weights` (see the
    module docstring); the same interface as PackedWindows."""

    def __init__(self, parts: list[PackedWindows], weights: list[float], batch_size: int) -> None:
        self.parts = parts
        self.weights = weights
        self.batch_size = batch_size
        self.taken = [0] * len(parts)

    @property
    def epoch(self) -> int:
        """The most passes any component has completed."""
        return max(p.epoch for p in self.parts)

    def next_component(self) -> int:
        """The component of the next window (the largest w_i·(k+1) − n_i; ties to the first)."""
        k = sum(self.taken) + 1
        return max(range(len(self.parts)), key=lambda i: (self.weights[i] * k - self.taken[i], -i))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y): int64 tensors [batch_size, seq_len], rows in draw order."""
        picks = []
        for _ in range(self.batch_size):
            picks.append(self.next_component())
            self.taken[picks[-1]] += 1
        x = torch.empty(self.batch_size, self.parts[0].seq_len, dtype=torch.int64)
        y = torch.empty_like(x)
        for i, part in enumerate(self.parts):
            rows = [r for r, pick in enumerate(picks) if pick == i]
            if rows:
                x[rows], y[rows] = part.gather(part.next_starts(len(rows)))
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"mix": self.weights, "taken": list(self.taken), "parts": [p.state_dict() for p in self.parts],
                "world_size": self.parts[0].world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was taken; a GrowfamError for another mixture.

        `state` may come from another world size w: every rank drew the same components, so the
        ranks have consumed w·n_i windows of component i between them; each component's cursor
        carries over as PackedWindows' does (or refuses), and this rank's counts become
        w·n_i / world_size — whole, since a carried-over cursor has both worlds cut the epoch to
        the same length and split the consumed windows evenly."""
        if "mix" not in state or state["mix"] != self.weights or len(state.get("parts", ())) != len(self.parts):
            raise GrowfamError(f"data cursor does not match this mixture: weights {state.get('mix')!r} in the "
                               f"checkpoint but {self.weights!r} now")
        for part, saved in zip(self.parts, state["parts"]):
            part.load_state_dict({**saved, "rank": part.rank})
        world, now = int(state["world_size"]), self.parts[0].world_size
        self.taken = [int(n) * world // now for n in state["taken"]]


def write_mixture(out_dir: str | Path, mix: list[tuple[str, float]]) -> Mixture:
    """A folder holding mixture.json for `mix` (checked: every dataset opens, one tokenizer)."""
    mixture = Mixture(mix, Path(out_dir))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    record = {"format": MIXTURE_FORMAT, "mix": mixture.spec()}
    atomic_write_text(Path(out_dir) / MIXTURE_FILE, json.dumps(record, indent=2) + "\n")
    return mixture


def open_dataset(data: str | Path | dict) -> TokenDataset | Mixture:
    """A prepared dataset directory, a mixture folder (mixture.json), or an inline {mix: [...]}."""
    if isinstance(data, dict):
        if set(data) != {"mix"}:
            raise ConfigError(f"data must be a dataset directory or {{mix: [...]}}, got keys {sorted(data)}")
        return Mixture(parse_mix(data["mix"]))
    path = Path(data)
    if (path / MIXTURE_FILE).is_file():
        return Mixture(read_mix(path), path)
    return TokenDataset.open(path)


def read_mix(folder: str | Path) -> list[tuple[str, float]]:
    """The [(dir, weight)] a mixture folder's mixture.json records; GrowfamError for a file that
    is not a growfam mixture, ConfigError for a malformed mix in it."""
    path = Path(folder) / MIXTURE_FILE
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != MIXTURE_FORMAT:
        raise GrowfamError(f"{path}: not a growfam mixture")
    return parse_mix(record.get("mix"), str(path))


def train_windows(dataset, seq_len: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                  max_unique_tokens: int | None = None) -> PackedWindows | MixedWindows:
    """The training batches of a dataset (its train split's PackedWindows) or of a Mixture."""
    if isinstance(dataset, Mixture):
        return dataset.windows(seq_len, batch_size, seed, rank=rank, world_size=world_size,
                               max_unique_tokens=max_unique_tokens)
    return PackedWindows(dataset.tokens("train"), seq_len, batch_size, seed, rank=rank, world_size=world_size,
                         max_unique_tokens=max_unique_tokens)
