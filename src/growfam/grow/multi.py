"""Growth from several sources (model growth from several smaller models): combine them into
one model, then `expand` it.

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
from growfam.grow.growth import DEFAULT_DEPTH, DEFAULT_WIDTH, assemble
from growfam.grow.report import GrowthReport, compare, probe_logits
from growfam.model import Llama, ModelConfig, resolve_config

COMBINE_MODES = ("depth", "width")
DEFAULT_COMBINE = "depth"  # when a caller names none


def _require_equal(configs: list[ModelConfig], keys: tuple[str, ...], why: str) -> None:
    for key in keys:
        values = [getattr(c, key) for c in configs]
        if len(set(values)) > 1:
            raise ConfigError(f"{why}: sources differ in {key} ({values})")


def combined_config(configs: list[ModelConfig], combine: str = DEFAULT_COMBINE) -> ModelConfig:
    """The config of the model that `combine` makes of sources of `configs` (rule: module
    docstring); ConfigError for no source, an unknown mode or sources it cannot combine."""
    if not configs:
        raise ConfigError("combining needs at least one source model")
    if combine not in COMBINE_MODES:
        raise ConfigError(f"unknown combine mode {combine!r}; known: {', '.join(COMBINE_MODES)}")
    name = "+".join(c.name for c in configs)
    if combine == "depth":
        _require_equal(configs, ("d_model", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                                 "tie_embeddings", "rope_theta", "norm_eps"),
                       "combine='depth' interleaves layers into one residual stream")
        return configs[0].replace(n_layers=sum(c.n_layers for c in configs), name=name)
    _require_equal(configs, ("n_layers", "head_dim", "n_rep", "vocab_size", "tie_embeddings",
                             "rope_theta", "norm_eps"),
                   "combine='width' concatenates units layer by layer")
    return configs[0].replace(
        d_model=sum(c.d_model for c in configs), n_heads=sum(c.n_heads for c in configs),
        n_kv_heads=sum(c.n_kv_heads for c in configs), ffn_dim=sum(c.ffn_dim for c in configs),
        name=name)


def _depth_tensors(models: list[Llama]) -> dict[str, torch.Tensor]:
    order = sorted(((l + 0.5) / m.cfg.n_layers, k, l)
                   for k, m in enumerate(models) for l in range(m.cfg.n_layers))
    tensors = {n: p.detach().clone() for n, p in models[0].named_parameters()
               if not n.startswith("layers.")}
    for j, (_, k, l) in enumerate(order):
        for n, p in models[k].layers[l].named_parameters():
            tensors[f"layers.{j}.{n}"] = p.detach().clone()
    return tensors


def _width_tensors(models: list[Llama]) -> dict[str, torch.Tensor]:
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
    return tensors


def expand_from(models: list[Llama], target_config: str | Path | dict | ModelConfig,
                width: str = DEFAULT_WIDTH, depth: str = DEFAULT_DEPTH, seed: int = 0,
                probe: torch.Tensor | None = None, *, combine: str = DEFAULT_COMBINE,
                mask_steps: int = 1000) -> tuple[Llama, GrowthReport]:
    """Grow one model of `target_config` from several sources (rule: module docstring).

    Returns (grown model, GrowthReport); the report's source is the combined model.
    """
    cfg = combined_config([m.cfg for m in models], combine)
    tensors = (_depth_tensors if combine == "depth" else _width_tensors)(models)
    combined = assemble(cfg, tensors, training=models[0].training)
    grown, _, report = expand(combined, resolve_config(target_config), width, depth, seed,
                              mask_steps=mask_steps)
    report.notes.append(f"combined from {len(models)} sources by {combine} "
                        f"({', '.join(m.cfg.name for m in models)}); primary: {models[0].cfg.name}")
    if probe is not None and combined.embed_tokens.weight.device.type != "meta":
        report.probe = compare(probe_logits(models[0], probe), probe_logits(grown, probe))
    return grown, report
