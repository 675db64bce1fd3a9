"""Growth from several sources (seed 004): combine them into one model, then `expand` it.

Which source fills what:
- combine="depth" (sources of equal width, any depths): the combined model has all their
  layers, interleaved evenly — source k's layer l sits at fraction (l + ½)/L_k of the depth,
  ties broken by the order of `models` (equal depths give A0 B0 A1 B1 …). The first model is
  the primary: it alone supplies the embedding, the final norm and the output head.
- combine="width" (sources of equal depth, head_dim and GQA ratio): the combined model
  concatenates their units — residual dims, heads (with their KV groups) and FFN units in the
  order of `models` — with block-diagonal layer weights, so no source reads another's units;
  embeddings and heads are concatenated along d, and the final norm gains divided by the
  number of sources so the logits are the mean of the sources' contributions.
The combined model is then grown to the target with the usual width and depth operators.
The probe compares the grown model with the primary source.
"""

from __future__ import annotations

from pathlib import Path

import torch

from growfam.errors import ConfigError
from growfam.grow.expansion import expand
from growfam.grow.growth import assemble
from growfam.grow.report import GrowthReport, compare, probe_logits
from growfam.model import Llama, ModelConfig, resolve_config

COMBINE_MODES = ("depth", "width")


def _require_equal(models: list[Llama], keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        values = [getattr(m.cfg, key) for m in models]
        if len(set(values)) > 1:
            raise ConfigError(f"{why}: sources differ in {key} ({values})")


def _combine_depth(models: list[Llama]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    _require_equal(models, ("d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                            "tie_embeddings", "rope_theta", "norm_eps"),
                   "combine='depth' interleaves layers into one residual stream")
    order = sorted(((l + 0.5) / m.cfg.n_layers, k, l)
                   for k, m in enumerate(models) for l in range(m.cfg.n_layers))
    primary = models[0]
    tensors = {n: p.detach().clone() for n, p in primary.named_parameters()
               if not n.startswith("layers.")}
    for j, (_, k, l) in enumerate(order):
        for n, p in models[k].layers[l].named_parameters():
            tensors[f"layers.{j}.{n}"] = p.detach().clone()
    cfg = primary.cfg.replace(n_layers=len(order), name="+".join(m.cfg.name for m in models))
    return cfg, tensors


def _combine_width(models: list[Llama]) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    _require_equal(models, ("n_layers", "head_dim", "n_rep", "vocab_size", "tie_embeddings",
                            "rope_theta", "norm_eps"),
                   "combine='width' concatenates units layer by layer")
    cfg = models[0].cfg.replace(
        d_model=sum(m.cfg.d_model for m in models), n_heads=sum(m.cfg.n_heads for m in models),
        n_kv_heads=sum(m.cfg.n_kv_heads for m in models),
        ffn_dim=sum(m.cfg.ffn_dim for m in models), name="+".join(m.cfg.name for m in models))
    tensors = {}
    for name, p in models[0].named_parameters():
        parts = [m.get_parameter(name).detach() for m in models]
        if name == "norm.weight":
            tensors[name] = torch.cat(parts) / len(models)
        elif p.ndim == 1:
            tensors[name] = torch.cat(parts)
        elif name in ("embed_tokens.weight", "lm_head.weight"):
            tensors[name] = torch.cat(parts, dim=1)
        else:
            tensors[name] = torch.block_diag(*parts)
    return cfg, tensors


def expand_from(models: list[Llama], target_config: str | Path | dict | ModelConfig,
                width: str = "aki", depth: str = "stack", seed: int = 0,
                probe: torch.Tensor | None = None, *, combine: str = "depth",
                mask_steps: int = 1000) -> tuple[Llama, GrowthReport]:
    """Grow one model of `target_config` from several sources (rule: module docstring).

    Returns (grown model, GrowthReport); the report's source is the combined model.
    """
    if not models:
        raise ConfigError("expand_from needs at least one source model")
    if combine not in COMBINE_MODES:
        raise ConfigError(f"unknown combine mode {combine!r}; known: {', '.join(COMBINE_MODES)}")
    cfg, tensors = (_combine_depth if combine == "depth" else _combine_width)(models)
    combined = assemble(cfg, tensors, training=models[0].training)
    grown, _, report = expand(combined, resolve_config(target_config), width, depth, seed,
                              mask_steps=mask_steps)
    report.notes.append(f"combined from {len(models)} sources by {combine} "
                        f"({', '.join(m.cfg.name for m in models)}); primary: {models[0].cfg.name}")
    if probe is not None and combined.embed_tokens.weight.device.type != "meta":
        report.probe = compare(probe_logits(models[0], probe), probe_logits(grown, probe))
    return grown, report
