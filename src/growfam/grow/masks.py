"""Growth masks of the `masked` width operator (MSG, arXiv 2305.02869; PDG of Wang et al., "When
and How to Grow?", ACML 2024), as forward hooks.

New residual dimensions, query heads and FFN units are gated by masks that start at 0 (the
grown model computes exactly what the source did) and ramp to 1 over `steps` optimizer steps.
The ramp switches units on one after another, as PDG does, but each one continuously:
after s steps, new unit t (0-based among the n new ones) has mask clamp(s·n/steps − t, 0, 1).
When every mask is 1 the masks are removed ("folded"): the model is then a plain Llama.

The model does not know about masks; hooks on its modules apply them:

- every RMSNorm (forward hook): its output is recomputed with statistics over the active,
  mask-weighted dimensions and gated by the mask: x · rsqrt(Σ m·x² / Σ m + eps) · m · γ,
  so the new (zero-mask) dimensions neither count in the RMS nor pass through;
- every attention's o_proj (forward pre-hook): the merged head outputs [B, T, H·hd] times the
  head mask repeated per head dimension;
- every FFN's down_proj (forward pre-hook): the hidden units [B, T, ffn] times the unit mask.

`attach_masks` adds the hooks, `advance_masks` moves the ramp one optimizer step (the trainer
calls it through a callback), `fold_masks` removes them. A compiled function sees hooks added
or removed after it was traced only if it guards on them (the trainer's torch.compile does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from growfam.errors import ConfigError
from growfam.model import Attention, FeedForward, Llama, ModelConfig, RMSNorm


@dataclass
class MaskState:
    """Ramp position. sizes: per gated dimension ("d", "heads", "ffn"), (n_source, n_target)."""

    steps: int
    sizes: dict[str, tuple[int, int]]
    step: int = 0

    @classmethod
    def between(cls, src: ModelConfig, tgt: ModelConfig, steps: int) -> "MaskState":
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"mask_steps must be a positive integer, got {steps!r}")
        return cls(steps, {"d": (src.d_model, tgt.d_model), "heads": (src.n_heads, tgt.n_heads),
                           "ffn": (src.ffn_dim, tgt.ffn_dim)})

    def mask(self, key: str) -> torch.Tensor:
        """[n_target] float64: 1 for source units, the ramp for new ones."""
        n_s, n_t = self.sizes[key]
        new = torch.arange(n_t - n_s, dtype=torch.float64)
        ramp = (self.step * (n_t - n_s) / self.steps - new).clamp(0, 1)
        return torch.cat([torch.ones(n_s, dtype=torch.float64), ramp])


def _cast(mask: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`mask` on x's device, rounded to the gated module's weight dtype and then cast to x's: the
    masks are rounded to the model's precision (bf16 under autocast sees bf16(fp32(mask)))."""
    return mask.to(device=x.device, dtype=weight.dtype).to(x.dtype)


class _Ramp:
    """One model's masks: the ramp state, the [n] masks applied now, the hooks applying them."""

    def __init__(self, model: Llama, state: MaskState) -> None:
        self.state = state
        self.like = model.embed_tokens.weight  # masks take the model's dtype and device
        self.head_dim = model.cfg.head_dim
        self.masks: dict[str, torch.Tensor] = {}  # per key, [n_target]
        self.head_units = torch.empty(0)  # the head mask repeated per head dimension
        self.handles: list[RemovableHandle] = []
        for module in model.modules():
            if isinstance(module, RMSNorm):
                self.handles.append(module.register_forward_hook(self.norm_hook))
            elif isinstance(module, Attention):
                self.handles.append(module.o_proj.register_forward_pre_hook(self.heads_hook))
            elif isinstance(module, FeedForward):
                self.handles.append(module.down_proj.register_forward_pre_hook(self.units_hook))
        self.write()

    def write(self) -> None:
        """Compute the masks of the current step (in the model's dtype, on its device)."""
        like = self.like
        self.masks = {k: self.state.mask(k).to(like.dtype).to(like.device) for k in self.state.sizes}
        self.head_units = self.masks["heads"].repeat_interleave(self.head_dim)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def norm_hook(self, norm: RMSNorm, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the active dimensions; x: [..., d] -> [..., d] (replaces the output)."""
        x = args[0]
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        m = _cast(self.masks["d"], norm.weight, x)
        x = x * torch.rsqrt((x.pow(2) * m).sum(-1, keepdim=True) / m.sum() + norm.eps) * m
        return norm.weight * x.to(dtype)

    def heads_hook(self, o_proj: nn.Linear, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        """Gate the merged head outputs [B, T, n_heads·head_dim] before o_proj."""
        return (args[0] * _cast(self.head_units, o_proj.weight, args[0]),)

    def units_hook(self, down_proj: nn.Linear, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor]:
        """Gate the FFN's hidden units [B, T, ffn_dim] before down_proj."""
        return (args[0] * _cast(self.masks["ffn"], down_proj.weight, args[0]),)


def _ramp(model: Llama) -> _Ramp | None:
    return getattr(model, "growth_masks", None)


def attach_masks(model: Llama, state: MaskState) -> None:
    """Gate `model`'s new units with `state`'s masks (all new units at 0 when step is 0),
    replacing any masks it carries."""
    fold_masks(model)
    model.growth_masks = _Ramp(model, state)


def mask_state(model: Llama) -> MaskState | None:
    """The model's ramp state, or None when it carries no masks."""
    ramp = _ramp(model)
    return None if ramp is None else ramp.state


def applied_masks(model: Llama) -> dict[str, torch.Tensor] | None:
    """The masks the hooks apply now ({"d": [d_model], "heads": [n_heads], "ffn": [ffn_dim]},
    in the model's dtype), or None when the model carries no masks."""
    ramp = _ramp(model)
    return None if ramp is None else dict(ramp.masks)


@torch.no_grad()
def advance_masks(model: Llama) -> None:
    """Advance a masked model's ramp by one optimizer step; fold the masks away once they reach
    1. A no-op for a model that carries no masks."""
    ramp = _ramp(model)
    if ramp is None:
        return
    ramp.state.step += 1
    if ramp.state.step >= ramp.state.steps:
        fold_masks(model)
    else:
        ramp.write()


def fold_masks(model: Llama) -> None:
    """Remove the masks and their hooks (the model then computes what it did at mask 1)."""
    ramp = _ramp(model)
    if ramp is not None:
        ramp.remove()
        del model.growth_masks
