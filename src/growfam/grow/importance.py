"""Which parts of a model matter, measured on calibration windows, and the PruneMaps that keep
the most important ones for a smaller shape (Minitron's activation importance: Muralidharan et
al., "Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679).

`activation_importance(model, windows)` runs the model over calibration windows (one at a time:
Minitron found larger batches cost accuracy) and accumulates, in float64 sums that do not depend
on the windows' order:

- hidden channel c: mean |x_c| of every RMSNorm's output (each block's two and the final one),
  summed over the norms;
- KV group g of layer l: the mean L2 norm of its query heads' attention outputs (before o_proj),
  summed over the group's heads;
- FFN neuron j of layer l: mean |silu(gate_j) · up_j|;
- layer l: mean 1 − cos(x_in, x_out) of the block over positions (how much the block changes the
  residual stream).

`magnitude_importance(model)` uses weight norms instead (no data), `random_importance(cfg, seed)`
random scores: the baselines to compare against (`measure(rule, ...)` picks one by name).
`select(importance, target, depth=...)` keeps
the top channels, groups and neurons (per layer) and either a contiguous run of layers (the
block of layers with the least total importance is dropped; Minitron found contiguous depth
pruning best) or the most important layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from growfam.errors import ConfigError
from growfam.grow.prune import PruneMaps
from growfam.model import Llama, ModelConfig

#: Width rules (how channels, groups and neurons are scored) and depth rules (which layers go).
WIDTH_RULES = ("importance", "magnitude", "random")
DEPTH_RULES = ("contiguous", "importance", "none")


@dataclass
class Importance:
    """Scores, higher = keep: hidden [d_model], groups [n_layers, n_kv_heads], ffn
    [n_layers, ffn_dim], layers [n_layers]; float64."""

    hidden: torch.Tensor
    groups: torch.Tensor
    ffn: torch.Tensor
    layers: torch.Tensor

    def to_dict(self) -> dict[str, list]:
        """Plain lists (JSON): hidden [d_model], groups and ffn [n_layers][...], layers [n_layers]."""
        return {k: getattr(self, k).tolist() for k in ("hidden", "groups", "ffn", "layers")}


@torch.no_grad()
def activation_importance(model: Llama, windows: torch.Tensor, progress: bool = False) -> Importance:
    """Activation importance of `model` over calibration `windows` [N, T] int64 (one forward pass
    per window; a progress bar with `progress`). A ConfigError for an empty calibration set."""
    from tqdm import tqdm

    if windows.ndim != 2 or len(windows) == 0:
        raise ConfigError(f"the calibration set is empty or not [windows, tokens]: shape {tuple(windows.shape)}")
    cfg, device = model.cfg, next(model.parameters()).device
    L, hd = cfg.n_layers, cfg.head_dim
    sums = {"hidden": torch.zeros(cfg.d_model, dtype=torch.float64), "groups": torch.zeros(L, cfg.n_kv_heads,
            dtype=torch.float64), "ffn": torch.zeros(L, cfg.ffn_dim, dtype=torch.float64),
            "layers": torch.zeros(L, dtype=torch.float64)}
    positions = 0
    hooks = []

    def norm_hook(_module, _inputs, out):
        sums["hidden"] += out.detach().double().abs().sum(dim=(0, 1)).cpu()

    def heads_hook(layer: int):
        def hook(_module, inputs):
            x = inputs[0].detach().double()  # [B, T, n_heads · head_dim]
            per_head = x.view(*x.shape[:2], cfg.n_heads, hd).norm(dim=-1).sum(dim=(0, 1))  # [n_heads]
            sums["groups"][layer] += per_head.view(cfg.n_kv_heads, cfg.n_rep).sum(-1).cpu()
        return hook

    def ffn_hook(layer: int):
        def hook(_module, inputs):
            sums["ffn"][layer] += inputs[0].detach().double().abs().sum(dim=(0, 1)).cpu()
        return hook

    def block_hook(layer: int):
        def hook(_module, inputs, out):
            x_in, x_out = inputs[0].detach().double(), out.detach().double()
            sums["layers"][layer] += (1 - torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)).sum().cpu()
        return hook

    hooks.append(model.norm.register_forward_hook(norm_hook))
    for i, block in enumerate(model.layers):
        hooks += [block.input_layernorm.register_forward_hook(norm_hook),
                  block.post_attention_layernorm.register_forward_hook(norm_hook),
                  block.self_attn.o_proj.register_forward_pre_hook(heads_hook(i)),
                  block.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)),
                  block.register_forward_hook(block_hook(i))]
    try:
        for window in tqdm(windows, desc="importance", unit="window", disable=not progress):
            model(window[None].to(device), last=1)  # the head's logits are not needed
            positions += window.numel()
    finally:
        for hook in hooks:
            hook.remove()
    return Importance(**{k: v / positions for k, v in sums.items()})


@torch.no_grad()
def magnitude_importance(model: Llama) -> Importance:
    """Weight-norm importance (no data): a channel's embedding column norm plus its rows of o and
    down; a group's o columns; a neuron's down column; a layer's o and down norms."""
    cfg = model.cfg
    hd, blocks = cfg.head_dim, list(model.layers)

    def col_norms(w: torch.Tensor) -> torch.Tensor:
        return w.detach().double().norm(dim=0).cpu()

    hidden = col_norms(model.embed_tokens.weight) + sum(
        b.self_attn.o_proj.weight.detach().double().norm(dim=1).cpu() + b.mlp.down_proj.weight.detach().double()
        .norm(dim=1).cpu() for b in blocks)
    groups = torch.stack([col_norms(b.self_attn.o_proj.weight).view(cfg.n_kv_heads, cfg.n_rep * hd).sum(-1)
                          for b in blocks])
    ffn = torch.stack([col_norms(b.mlp.down_proj.weight) for b in blocks])
    layers = torch.stack([b.self_attn.o_proj.weight.detach().double().norm().cpu()
                          + b.mlp.down_proj.weight.detach().double().norm().cpu() for b in blocks])
    return Importance(hidden, groups, ffn, layers)


def random_importance(cfg: ModelConfig, seed: int = 0) -> Importance:
    """Random scores (a seeded generator): the baseline an importance rule must beat."""
    g = torch.Generator().manual_seed(seed)
    return Importance(torch.rand(cfg.d_model, generator=g, dtype=torch.float64),
                      torch.rand(cfg.n_layers, cfg.n_kv_heads, generator=g, dtype=torch.float64),
                      torch.rand(cfg.n_layers, cfg.ffn_dim, generator=g, dtype=torch.float64),
                      torch.rand(cfg.n_layers, generator=g, dtype=torch.float64))


def measure(rule: str, model: Llama, windows: torch.Tensor | None = None, seed: int = 0,
            progress: bool = False) -> Importance:
    """The importance of `model` by width rule `rule` ("importance": activations on calibration
    `windows` [N, T], "magnitude", or "random" with `seed`), every dimension, layers too."""
    if rule not in WIDTH_RULES:
        raise ConfigError(f"width rule must be one of {', '.join(WIDTH_RULES)}, got {rule!r}")
    if rule == "importance":
        if windows is None:
            raise ConfigError("activation importance needs calibration windows")
        return activation_importance(model, windows, progress)
    return magnitude_importance(model) if rule == "magnitude" else random_importance(model.cfg, seed)


def _top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """The indices of the k largest scores, sorted (ties: the lower index first)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:k]))


def select(importance: Importance, source: ModelConfig, target: ModelConfig, depth: str = "contiguous") -> PruneMaps:
    """The PruneMaps from `source` to `target`'s shape keeping the most important parts; depth
    "contiguous" drops the contiguous run of layers with the least total importance, "importance"
    the least important layers, "none" none (the target keeps the source's depth). A
    ConfigError for a target that is not smaller or equal in every
    dimension, or that breaks the GQA grouping."""
    if depth not in DEPTH_RULES:
        raise ConfigError(f"depth must be one of {', '.join(DEPTH_RULES)}, got {depth!r}")
    for name in ("d_model", "n_layers", "n_kv_heads", "ffn_dim", "n_heads"):
        if getattr(target, name) > getattr(source, name):
            raise ConfigError(f"the target's {name} ({getattr(target, name)}) is larger than the source's "
                              f"({getattr(source, name)}): use expand to grow a model")
    if target.head_dim != source.head_dim or target.n_rep != source.n_rep:
        raise ConfigError(f"pruning keeps whole GQA groups: the target needs head_dim {source.head_dim} and "
                          f"{source.n_rep} query heads per KV head, got {target.head_dim} and {target.n_rep}")
    drop = source.n_layers - target.n_layers
    if depth == "none" and drop:
        raise ConfigError(f"depth rule none keeps all {source.n_layers} layers, but the target has "
                          f"{target.n_layers}: choose contiguous or importance")
    if depth == "importance" or drop == 0:
        layers = _top(importance.layers, target.n_layers)
    else:
        start = min(range(source.n_layers - drop + 1),
                    key=lambda s: (float(importance.layers[s:s + drop].sum()), s))
        layers = tuple(i for i in range(source.n_layers) if not start <= i < start + drop)
    return PruneMaps(_top(importance.hidden, target.d_model), layers,
                     tuple(_top(importance.groups[i], target.n_kv_heads) for i in layers),
                     tuple(_top(importance.ffn[i], target.ffn_dim) for i in layers))
