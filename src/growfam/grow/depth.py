"""Depth operators: where the new layers go and what an inserted layer holds.

Each operator is a placement (maps.stack_map or maps.spread_map) plus what an *inserted*
layer (a later occurrence of its source, maps.DepthMap.new) does with each of its tensors:
copy its source layer, or a fill ("zero" / "random") for some or all tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from growfam.grow import maps
from growfam.grow.width import Fill

# An o_proj bias writes the residual too; zero v biases keep a layer with zero norms silent.
_OUTPUTS = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight")
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.v_proj.bias",
          "self_attn.o_proj.bias")


@dataclass(frozen=True)
class DepthOp:
    """A depth operator. `fills` maps a layer tensor suffix to its fill in an inserted layer
    ("*" = every tensor); unlisted tensors copy the source layer."""

    name: str
    exact: str
    place: Callable[[int, int], maps.DepthMap]
    fills: dict[str, Fill] = field(default_factory=dict)

    def fill(self, suffix: str) -> Fill:
        return self.fills.get(suffix, self.fills.get("*"))

    @property
    def copies(self) -> bool:
        """Inserted layers are plain copies (they inherit their source's optimizer moments)."""
        return not self.fills


DEPTH_OPS: dict[str, DepthOp] = {op.name: op for op in (
    DepthOp("stack", "not exact (bert2BERT Algorithm 1: repeat the stack, then the top layers)",
            maps.stack_map),
    DepthOp("interleave", "not exact (each layer duplicated in place, spread evenly)",
            maps.spread_map),
    DepthOp("identity", "exact (inserted copies with zero o_proj and down_proj)", maps.spread_map,
            {s: "zero" for s in _OUTPUTS}),
    DepthOp("redundant", "exact (inserted copies with zero RMSNorm gains, v/o biases)", maps.spread_map,
            {s: "zero" for s in _NORMS}),
    DepthOp("zero", "exact (inserted layers all zero); they get no gradient", maps.spread_map,
            {"*": "zero"}),
    DepthOp("random", "not exact (inserted layers freshly initialised)", maps.spread_map,
            {"*": "random"}),
)}
