"""Structured pruning, the inverse of a width and depth map: keep a subset of a model's hidden
channels, attention groups, FFN neurons and layers, and slice every tensor consistently.

`PruneMaps` holds the kept indices of each dimension (sorted, unique); `prune(model, maps)` makes
the smaller Llama:

- hidden channels: the columns of the embedding and the output head, the norms' gains, the input
  columns of q/k/v and gate/up, the output rows (and bias) of o and down;
- attention groups: a kept KV head keeps its query heads (GQA groups stay whole; with plain
  multi-head attention a group is one head): rows (and biases) of q, k and v, input columns of
  o; head_dim and RoPE are unchanged;
- FFN neurons: rows of gate and up, columns of down;
- layers: the kept blocks, in order.

RMSNorm normalises over the channels it sees, so keeping d' of d channels changes its scale.
With `rescale_norms` (the default) every norm's gain is multiplied by √(d/d') and norm_eps by
d/d', which is exact when the dropped channels are zero throughout the residual stream:
x / √(Σx²/d + ε) = √(d/d') · x / √(Σx²/d' + ε·d/d'). Dropping attention groups, neurons or
blocks whose output weights are zero is exact too; anything else is an approximation that
recovery training (distillation from the unpruned model) repairs.

Which indices to keep is the importance rule's business (Minitron: Muralidharan et al.,
"Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679); this module
only slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from growfam.errors import ConfigError
from growfam.model import Llama, ModelConfig


@dataclass(frozen=True)
class PruneMaps:
    """Kept indices, each sorted and unique: hidden channels of d_model (one residual stream for
    every layer), layers of n_layers, and for each kept layer, in order, its KV groups of
    n_kv_heads and its FFN neurons of ffn_dim (as many in every layer: one config holds them)."""

    hidden: tuple[int, ...]
    layers: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    ffn: tuple[tuple[int, ...], ...]

    @classmethod
    def identity(cls, cfg: ModelConfig) -> "PruneMaps":
        """Keep everything."""
        return cls(tuple(range(cfg.d_model)), tuple(range(cfg.n_layers)),
                   (tuple(range(cfg.n_kv_heads)),) * cfg.n_layers, (tuple(range(cfg.ffn_dim)),) * cfg.n_layers)

    def check(self, cfg: ModelConfig) -> None:
        """ConfigError naming the first map that is empty, unsorted, repeated, out of range or
        uneven across layers."""
        if len(self.groups) != len(self.layers) or len(self.ffn) != len(self.layers):
            raise ConfigError(f"pruning keeps {len(self.layers)} layers but gives groups for {len(self.groups)} "
                              f"and neurons for {len(self.ffn)}")
        for name, per_layer in (("groups", self.groups), ("ffn", self.ffn)):
            if len({len(kept) for kept in per_layer}) > 1:
                raise ConfigError(f"pruning keeps {sorted({len(k) for k in per_layer})} {name} in different layers; "
                                  "every layer must keep as many")
        for name, kept, size in (("hidden", self.hidden, cfg.d_model), ("layers", self.layers, cfg.n_layers),
                                 *(("groups", g, cfg.n_kv_heads) for g in self.groups),
                                 *(("ffn", f, cfg.ffn_dim) for f in self.ffn)):
            if not kept:
                raise ConfigError(f"pruning keeps no {name}")
            if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
                raise ConfigError(f"the kept {name} must be sorted, unique indices in [0, {size}), "
                                  f"got {list(kept)[:8]}")

    def config(self, cfg: ModelConfig, rescale_norms: bool = True) -> ModelConfig:
        """The pruned model's config (head_dim kept; norm_eps × d/d' with rescale_norms)."""
        d, groups = len(self.hidden), len(self.groups[0])
        return cfg.replace(d_model=d, n_layers=len(self.layers), n_heads=groups * cfg.n_rep, n_kv_heads=groups,
                           ffn_dim=len(self.ffn[0]), head_dim=cfg.head_dim,
                           norm_eps=cfg.norm_eps * cfg.d_model / d if rescale_norms else cfg.norm_eps)


def _heads(groups: tuple[int, ...], per_group: int, head_dim: int) -> torch.Tensor:
    """Row indices of the heads of `groups` (per_group heads each) in a [heads·head_dim, ...] weight."""
    heads = [g * per_group + i for g in groups for i in range(per_group)]
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)])


def slice_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, maps: PruneMaps,
                  gain: float = 1.0) -> dict[str, torch.Tensor]:
    """`state` (a Llama's tensors by name, or anything shaped like them: AdamW moments) sliced
    by `maps`, the norms' entries multiplied by `gain`; keys of the pruned model. Not checked:
    `maps.check(cfg)` first."""
    device = next(iter(state.values())).device
    hidden = torch.tensor(maps.hidden, device=device)

    def rows_cols(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
        t = t if rows is None else t.index_select(0, rows)
        return t if cols is None else t.index_select(1, cols)

    out = {"embed_tokens.weight": rows_cols(state["embed_tokens.weight"], None, hidden),
           "norm.weight": state["norm.weight"][hidden] * gain}
    if "lm_head.weight" in state and not cfg.tie_embeddings:
        out["lm_head.weight"] = rows_cols(state["lm_head.weight"], None, hidden)
    for new, (old, groups, neurons) in enumerate(zip(maps.layers, maps.groups, maps.ffn)):
        src, dst = f"layers.{old}.", f"layers.{new}."
        q_rows = _heads(groups, cfg.n_rep, cfg.head_dim).to(device)
        kv_rows = _heads(groups, 1, cfg.head_dim).to(device)
        ffn = torch.tensor(neurons, device=device)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"{dst}{norm}.weight"] = state[f"{src}{norm}.weight"][hidden] * gain
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            out[f"{dst}self_attn.{proj}.weight"] = rows_cols(state[f"{src}self_attn.{proj}.weight"], rows, hidden)
            if cfg.qkv_bias:
                out[f"{dst}self_attn.{proj}.bias"] = state[f"{src}self_attn.{proj}.bias"][rows]
        out[f"{dst}self_attn.o_proj.weight"] = rows_cols(state[f"{src}self_attn.o_proj.weight"], hidden, q_rows)
        if cfg.o_bias:
            out[f"{dst}self_attn.o_proj.bias"] = state[f"{src}self_attn.o_proj.bias"][hidden]
        for proj in ("gate_proj", "up_proj"):
            out[f"{dst}mlp.{proj}.weight"] = rows_cols(state[f"{src}mlp.{proj}.weight"], ffn, hidden)
        out[f"{dst}mlp.down_proj.weight"] = rows_cols(state[f"{src}mlp.down_proj.weight"], hidden, ffn)
    return out


def norm_gain(cfg: ModelConfig, maps: PruneMaps, rescale_norms: bool = True) -> float:
    """The factor √(d/d') every norm's gain is multiplied by (1 without rescale_norms)."""
    return math.sqrt(cfg.d_model / len(maps.hidden)) if rescale_norms else 1.0


@torch.no_grad()
def prune(model: Llama, maps: PruneMaps, rescale_norms: bool = True) -> Llama:
    """The Llama that keeps `maps` of `model` (see the module docstring); `model` is not changed.
    Same dtype and device; a ConfigError for bad maps, before any copy."""
    cfg = model.cfg
    maps.check(cfg)
    out = slice_tensors(model.state_dict(), cfg, maps, norm_gain(cfg, maps, rescale_norms))
    with torch.device("meta"):
        pruned = Llama(maps.config(cfg, rescale_norms))
    pruned.load_state_dict({k: v.clone() for k, v in out.items()}, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        pruned.lm_head.weight = pruned.embed_tokens.weight
    return pruned
