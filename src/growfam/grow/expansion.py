"""`expand`: grow a model (and its AdamW state) into a larger config and report what changed."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from growfam.grow.growth import DEFAULT_DEPTH, DEFAULT_WIDTH, GrowthPlan, assemble
from growfam.grow.masks import MaskState, attach_masks, mask_state
from growfam.grow.optim import check_optimizer, grow_adamw
from growfam.grow.report import GrowthReport, ParamGrowth, compare, probe_logits, rms_mismatch
from growfam.errors import ConfigError
from growfam.model import Llama, ModelConfig, resolve_config


@torch.no_grad()
def expand(model: Llama, target_config: str | Path | dict | ModelConfig, width: str = DEFAULT_WIDTH,
           depth: str = DEFAULT_DEPTH, seed: int = 0, optimizer: torch.optim.AdamW | None = None,
           probe: torch.Tensor | None = None, *, optimizer_mode: str = "transfer",
           mask_steps: int = 1000, free_source: bool = False
           ) -> tuple[Llama, torch.optim.AdamW | None, GrowthReport]:
    """Grow `model` into `target_config` (a ModelConfig, preset name, YAML/JSON path or dict).

    width: a name in WIDTH_OPS; depth: a name in DEPTH_OPS; seed: the index maps and random
    fills. optimizer: an AdamW over `model`, returned as a new AdamW over the grown model with
    its state grown by the same maps (optimizer_mode "transfer") or fresh ("reset").
    probe: token ids [B, T]; the report then measures max |Δlogits| and Δloss (skipped on the
    meta device). mask_steps: the ramp length of the `masked` operator. free_source: release
    each source tensor after its last use (the source model is unusable afterwards).
    Returns (grown model, grown optimizer or None, GrowthReport). The grown model's config is
    target_config with the operator's norm_eps (lossless rescales it) and the source's dtype
    and device.
    """
    # Over 60 lines on purpose: growth is one transaction (plan, grow weights, grow moments, build
    # the new model, measure it) whose steps share the plan and the freed tensors; read top to bottom.
    start = time.perf_counter()
    if mask_state(model) is not None:
        raise ConfigError("the model still carries growth masks; finish their ramp "
                          "(advance_masks) before growing it again")
    requested = resolve_config(target_config)
    plan = GrowthPlan.make(model.cfg, requested, width, depth, seed)
    masks = MaskState.between(plan.source, plan.target, mask_steps) if plan.width.masked else None
    if optimizer is not None:
        check_optimizer(optimizer, optimizer_mode)
    weight = model.embed_tokens.weight
    numeric = probe is not None and weight.device.type != "meta"
    before = probe_logits(model, probe) if numeric else None
    replicated = plan.width.d_fill[0] is None
    rms = None
    if numeric and replicated:
        copies = torch.bincount(plan.spaces["d"].src, minlength=plan.source.d_model)
        rms = rms_mismatch(model, probe, copies.double(), plan.target.d_model)

    generator = None
    if weight.device.type != "meta":
        generator = torch.Generator(weight.device).manual_seed(seed + 1)
    params = dict(model.named_parameters())

    def release(name: str) -> None:
        params[name].data = torch.empty(0, dtype=weight.dtype, device=weight.device)

    tensors, counts = plan.apply(lambda n: params[n].detach(), "value", generator=generator,
                                 release=release if free_source else None)
    grown = assemble(plan.target, tensors, training=model.training)
    if masks is not None:
        attach_masks(grown, masks)
    new_optimizer = None
    if optimizer is not None:
        new_optimizer = grow_adamw(optimizer, model, grown, plan, optimizer_mode)

    exactness = {f"width {width}": plan.width.exact, f"depth {depth}": plan.depth.exact}
    report = GrowthReport(
        source=plan.source.to_dict(), target=plan.target.to_dict(), width=width, depth=depth,
        seed=seed, exactness=exactness,
        params=[ParamGrowth(n, plan.shapes[n], c.copied, c.split, c.new)
                for n, c in counts.items()],
        rms_factor=rms, optimizer=None if optimizer is None else optimizer_mode,
        mask_steps=None if masks is None else mask_steps)
    if numeric:
        report.probe = compare(before, probe_logits(grown, probe))
    if plan.target.norm_eps != requested.norm_eps:
        report.notes.append(f"norm_eps set to {plan.target.norm_eps:.6g} (source eps"
                            f"{' x D_s/D_t' if plan.width.rescale_norm else ''})")
    report.seconds = time.perf_counter() - start
    return grown, new_optimizer, report
