"""Growth masks of the `masked` width operator (MSG / PDG, seed 003 §3.3).

New residual dimensions, query heads and FFN units are gated by masks that start at 0 (the
grown model computes exactly what the source did: RMSNorm statistics use only the active,
mask-weighted dimensions, see model.RMSNorm) and ramp to 1 over `steps` optimizer steps.
The ramp switches units on one after another, as PDG does, but each one continuously:
after s steps, new unit t (0-based among the n new ones) has mask clamp(s·n/steps − t, 0, 1).
When every mask is 1 the masks are removed ("folded"): the model is then a plain Llama.

The state lives on the model as `model.growth_masks`; the trainer calls `advance_masks(model)`
after each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def _targets(model: Llama):
    """(module, buffer name, mask key) for every gated place in the model."""
    for module in model.modules():
        if isinstance(module, Attention):
            yield module, "head_mask", "heads"
        elif isinstance(module, FeedForward):
            yield module, "unit_mask", "ffn"
        elif isinstance(module, RMSNorm):
            yield module, "mask", "d"


def _write(model: Llama, state: MaskState | None) -> None:
    like = model.embed_tokens.weight
    values = {} if state is None else {
        k: state.mask(k).to(like.dtype).to(like.device) for k in state.sizes}
    for module, name, key in _targets(model):
        setattr(module, name, values.get(key))


def attach_masks(model: Llama, state: MaskState) -> None:
    """Gate `model`'s new units with `state`'s masks (all new units at 0 when step is 0)."""
    model.growth_masks = state
    _write(model, state)


def mask_state(model: Llama) -> MaskState | None:
    """The model's ramp state, or None when it carries no masks."""
    return getattr(model, "growth_masks", None)


@torch.no_grad()
def advance_masks(model: Llama) -> None:
    """Advance a masked model's ramp by one optimizer step; fold the masks away once they reach
    1. A no-op for a model that carries no masks."""
    state = mask_state(model)
    if state is None:
        return
    state.step += 1
    if state.step >= state.steps:
        fold_masks(model)
    else:
        _write(model, state)


def fold_masks(model: Llama) -> None:
    """Remove the masks (the model then computes what it did at mask 1)."""
    _write(model, None)
    if mask_state(model) is not None:
        del model.growth_masks
