"""Index maps: which source unit each target unit copies (width) or which source layer each
target layer comes from (depth).

Width maps keep the source units in place (`src[i] = i` for i < n_s) and give every new unit
a source unit to copy; `counts[k] = |src⁻¹(k)|` is how often unit k appears in the target.
Heads map whole blocks of head_dim rows so RoPE stays valid; with GQA the KV heads are mapped
and each query head follows its KV group (same position inside the group), which keeps the
query-per-KV ratio and makes a copied group compute exactly what its source group computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def balanced_map(n_source: int, n_target: int, generator: torch.Generator) -> torch.Tensor:
    """[n_target] int64: identity on the first n_source units, then seeded copies.

    New units draw their source uniformly *without replacement* (cycling through fresh random
    permutations), so the counts differ by at most one: at an integer ratio every unit is
    replicated equally, which is what makes fpi exact under RMSNorm.
    """
    extra = n_target - n_source
    rounds = -(-extra // n_source) if extra > 0 else 0
    picks = [torch.randperm(n_source, generator=generator) for _ in range(rounds)]
    new = torch.cat(picks)[:extra] if picks else torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(n_source), new])


def tiled_map(n_source: int, n_target: int) -> torch.Tensor:
    """[n_target] int64: i -> i mod n_source (hypercloning's tiling)."""
    return torch.arange(n_target) % n_source


def grouped_head_map(kv_src: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[H_t] query-head map from a [KV_t] KV-head map: query head j sits in KV group j // n_rep
    and copies the source query head at the same position of the mapped group."""
    j = torch.arange(len(kv_src) * n_rep)
    return kv_src[j // n_rep] * n_rep + j % n_rep


def blocks(unit_src: torch.Tensor, block: int) -> torch.Tensor:
    """[n·block] element map from an [n] unit map (each unit is `block` consecutive rows)."""
    return (unit_src[:, None] * block + torch.arange(block)).reshape(-1)


def counts(src: torch.Tensor, n_source: int) -> torch.Tensor:
    """[n_source] float64: how many target units copy each source unit."""
    return torch.bincount(src, minlength=n_source).to(torch.float64)


# --------------------------------------------------------------------------------------------
# Depth
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DepthMap:
    """Target layer j comes from source layer `src[j]`; `new[j]` marks an inserted layer (a
    later occurrence of its source), which depth operators may modify."""

    src: tuple[int, ...]
    new: tuple[bool, ...]


def _mark_new(src: list[int]) -> DepthMap:
    seen: set[int] = set()
    new = []
    for s in src:
        new.append(s in seen)
        seen.add(s)
    return DepthMap(tuple(src), tuple(new))


def stack_map(n_source: int, n_target: int) -> DepthMap:
    """bert2BERT Algorithm 1: the whole stack ⌊L_t/L_s⌋ times, then the top L_t mod L_s
    layers (18 -> 22 appends copies of layers 14..17)."""
    reps, rest = divmod(n_target, n_source)
    return _mark_new(list(range(n_source)) * reps + list(range(n_source - rest, n_source)))


def spread_map(n_source: int, n_target: int) -> DepthMap:
    """Duplicates spread evenly in place: target j <- source ⌊j·L_s/L_t⌋ (4 -> 6: 0,0,1,2,2,3);
    the second occurrence of a layer is the inserted one."""
    return _mark_new([j * n_source // n_target for j in range(n_target)])
