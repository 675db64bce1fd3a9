"""A growth plan: the width and depth maps from one config to another, applied to any set of
tensors named like the model's parameters (the weights, or an optimizer's moments)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from growfam.errors import ConfigError
from growfam.grow import maps
from growfam.grow.depth import DEPTH_OPS, DepthOp
from growfam.grow.width import (WIDTH_OPS, Axis, Counts, Space, WidthOp, check_width, fill_new,
                                grow_tensor, norm_rescale, width_spaces)
from growfam.model import Llama, ModelConfig, weight_std

#: Layer tensor suffix -> (space its rows write, space its columns read).
_LAYER_SPACES = {
    "self_attn.q_proj.weight": ("q", "d"),
    "self_attn.k_proj.weight": ("kv", "d"),
    "self_attn.v_proj.weight": ("kv", "d"),
    "self_attn.o_proj.weight": ("d", "q"),
    "mlp.gate_proj.weight": ("f", "d"),
    "mlp.up_proj.weight": ("f", "d"),
    "mlp.down_proj.weight": ("d", "f"),
}

#: Bias suffix -> the space it belongs to: a bias grows like its weight's rows (copied with
#: them, filled where they are filled, never divided), so exact operators stay exact.
_BIAS_SPACES = {"self_attn.q_proj.bias": "q", "self_attn.k_proj.bias": "kv",
                "self_attn.v_proj.bias": "kv", "self_attn.o_proj.bias": "d"}

#: Checkpoint features a grown model keeps: a target that leaves them at their defaults (a
#: preset, a plain config) takes the source's; one that sets them otherwise is refused.
_CARRIED = ("model_type", "qkv_bias", "o_bias", "rope_scaling", "sliding_window")

#: The operators when a caller names none: the paper's (bert2BERT AKI width, stacking depth).
DEFAULT_WIDTH, DEFAULT_DEPTH = "aki", "stack"

#: Fields a growth may not change (besides the grown shapes and the names).
_FIXED = ("vocab_size", "tie_embeddings", "rope_theta")


def lookup(registry: dict, kind: str, name: str):
    """registry[name], or a ConfigError naming the known operators."""
    if name not in registry:
        raise ConfigError(f"unknown {kind} operator {name!r}; known: {', '.join(registry)}")
    return registry[name]


def check_growth(src: ModelConfig, tgt: ModelConfig) -> None:
    """ConfigError unless tgt is src grown: no dimension shrinks, head_dim and the
    query-per-KV ratio stay, and the vocabulary, tying and RoPE base are unchanged."""
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        s, t = getattr(src, key), getattr(tgt, key)
        if t < s:
            raise ConfigError(f"cannot shrink {key} from {s} to {t}: growth only enlarges a model")
    if src.head_dim != tgt.head_dim:
        raise ConfigError(f"head_dim (d_model / n_heads) changes from {src.head_dim} to "
                          f"{tgt.head_dim}; growth keeps it fixed, so set n_heads = d_model / "
                          f"{src.head_dim}")
    if src.n_rep != tgt.n_rep:
        raise ConfigError(f"query heads per KV head change from {src.n_rep} to {tgt.n_rep}; "
                          f"growth keeps the GQA ratio, so set n_kv_heads = n_heads / {src.n_rep}")
    for key in _FIXED:
        if getattr(src, key) != getattr(tgt, key):
            raise ConfigError(f"{key} differs ({getattr(src, key)!r} -> {getattr(tgt, key)!r}); "
                              "growth keeps it")


def carry_over(src: ModelConfig, tgt: ModelConfig) -> ModelConfig:
    """tgt with the source's model type, biases, RoPE scaling and window (see _CARRIED)."""
    defaults = ModelConfig(d_model=2, n_layers=1, n_heads=1, ffn_dim=1)
    changes = {}
    for key in _CARRIED:
        s, t = getattr(src, key), getattr(tgt, key)
        if t == getattr(defaults, key):
            changes[key] = s
        elif t != s:
            raise ConfigError(f"{key} differs ({s!r} -> {t!r}); growth keeps it")
    return tgt.replace(**changes)


@dataclass
class GrowthPlan:
    """Everything a growth src -> target decides before touching a tensor.

    target carries the operator's norm_eps (lossless: eps·D_s/D_t; otherwise the source's).
    """

    source: ModelConfig
    target: ModelConfig
    width: WidthOp
    depth: DepthOp
    spaces: dict[str, Space]
    layers: maps.DepthMap
    shapes: dict[str, tuple[int, ...]]
    _axes: dict[str, tuple[Axis, ...]] = field(default_factory=dict, repr=False)

    @classmethod
    def make(cls, source: ModelConfig, target: ModelConfig, width: str = DEFAULT_WIDTH,
             depth: str = DEFAULT_DEPTH, seed: int = 0) -> "GrowthPlan":
        width_op = lookup(WIDTH_OPS, "width", width)
        depth_op = lookup(DEPTH_OPS, "depth", depth)
        target = carry_over(source, target)
        check_growth(source, target)
        check_width(width_op, source, target)
        target = target.replace(norm_eps=source.norm_eps * norm_rescale(width_op, source, target))
        generator = torch.Generator().manual_seed(seed)
        with torch.device("meta"):
            shapes = {n: tuple(p.shape) for n, p in Llama(target).named_parameters()}
        return cls(source, target, width_op, depth_op,
                   width_spaces(width_op, source, target, generator),
                   depth_op.place(source.n_layers, target.n_layers), shapes)

    # ---- names --------------------------------------------------------------------------------
    def source_name(self, name: str) -> str:
        """The source tensor a target tensor grows from (layer j -> its source layer)."""
        layer = _layer_of(name)
        return name if layer is None else f"layers.{self.layers.src[layer[0]]}.{layer[1]}"

    def axes(self, name: str) -> tuple[Axis, ...]:
        """How each axis of target tensor `name` grows (the same objects for every layer)."""
        role = re.sub(r"^layers\.\d+\.", "layers.*.", name)
        if role not in self._axes:
            self._axes[role] = self._make_axes(role)
        return self._axes[role]

    def _make_axes(self, name: str) -> tuple[Axis, ...]:
        d, op = self.spaces["d"], self.width
        factor = math.sqrt(norm_rescale(op, self.source, self.target))
        vocab = Axis.fixed(self.source.vocab_size)
        if name == "embed_tokens.weight":
            return vocab, d.write()
        if name == "lm_head.weight":
            return vocab, d.head()
        if name.endswith("norm.weight"):
            return (d.gain(op.gain_fill, factor, final=name == "norm.weight"),)
        if name.endswith(".bias"):
            return (self.spaces[_BIAS_SPACES[name.split(".", 2)[2]]].write(),)
        rows, cols = _LAYER_SPACES[name.split(".", 2)[2]]
        return self.spaces[rows].write(), self.spaces[cols].read()

    def _next_layer(self, name: str) -> tuple[int, str] | None:
        """aki: (dim of the new heads / units, source tensor of layer l+1); the top layer uses
        itself. A q/k/v bias is its new heads' too; the o bias (residual rows) is not."""
        layer = _layer_of(name)
        if not self.width.next_layer or layer is None:
            return None
        j, suffix = layer
        if suffix in _LAYER_SPACES:
            dim = 1 if _LAYER_SPACES[suffix][0] == "d" else 0
        elif _BIAS_SPACES.get(suffix, "d") != "d":
            dim = 0
        else:
            return None
        nxt = min(self.layers.src[j] + 1, self.source.n_layers - 1)
        return dim, f"layers.{nxt}.{suffix}"

    # ---- application --------------------------------------------------------------------------
    def apply(self, get: Callable[[str], torch.Tensor], mode: str = "value", *,
              generator: torch.Generator | None = None,
              release: Callable[[str], None] | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, Counts]]:
        """Grow every target tensor from `get(source_name)`.

        mode: "value" for weights, "m" / "v" for Adam's first / second moments (width.py).
        release(source_name) is called after a source tensor's last use (to free it early).
        Returns the target tensors and, in value mode, their copied / split / new counts.
        """
        uses = self._last_uses() if release is not None else {}
        out: dict[str, torch.Tensor] = {}
        counts: dict[str, Counts] = {}
        for name, shape in self.shapes.items():
            std = weight_std(self.target, name)
            layer = _layer_of(name)
            if layer is not None and self.layers.new[layer[0]]:
                # An inserted layer: a copy of its source layer's first occurrence, or fresh.
                j, suffix = layer
                original = f"layers.{self.layers.src.index(self.layers.src[j])}.{suffix}"
                fill = self.depth.fill(suffix)
                if fill is None and (mode == "value" or self.depth.copies):
                    out[name], counts[name] = out[original].clone(), counts[original]
                else:  # fresh; the moments of every tensor of a non-copy layer start at zero
                    like = out[original]
                    out[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
                    fill_new(out[name], fill if mode == "value" else None, std, generator)
                    counts[name] = Counts(new=math.prod(shape))
            else:
                nxt = self._next_layer(name)
                tail = None if nxt is None else (nxt[0], get(nxt[1]))
                out[name], counts[name] = grow_tensor(get(self.source_name(name)), self.axes(name),
                                                      mode, std=std, generator=generator, tail=tail)
            for done in uses.get(name, ()):
                release(done)
        return out, counts

    def _last_uses(self) -> dict[str, list[str]]:
        """target name -> source names used for the last time when it is built."""
        last: dict[str, str] = {}
        for name in self.shapes:
            layer = _layer_of(name)
            if layer is not None and self.layers.new[layer[0]]:
                continue
            last[self.source_name(name)] = name
            nxt = self._next_layer(name)
            if nxt is not None:
                last[nxt[1]] = name
        by_target: dict[str, list[str]] = {}
        for src_name, name in last.items():
            by_target.setdefault(name, []).append(src_name)
        return by_target


def _layer_of(name: str) -> tuple[int, str] | None:
    """(target layer, tensor suffix) of "layers.<j>.<suffix>"; None for other tensors."""
    if not name.startswith("layers."):
        return None
    _, j, suffix = name.split(".", 2)
    return int(j), suffix


def assemble(cfg: ModelConfig, tensors: dict[str, torch.Tensor], training: bool = False) -> Llama:
    """A Llama of `cfg` whose parameters are `tensors` (no copies; a tied head re-tied)."""
    with torch.device("meta"):
        model = Llama(cfg)
    for name, t in tensors.items():
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, nn.Parameter(t))
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.train(training)
