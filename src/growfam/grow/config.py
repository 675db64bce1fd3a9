"""The family YAML's `growth:` section (GrowthConfig): which operators grow each member into the
next, what happens to AdamW's moments, and when growth happens; and its `shrink:` section
(ShrinkConfig) for a family built downward. Imports checks, errors and the operator and rule
registries of grow/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from growfam.checks import Section, as_choice, as_int, as_number
from growfam.errors import ConfigError
from growfam.grow.depth import DEPTH_OPS
from growfam.grow.growth import DEFAULT_DEPTH, DEFAULT_WIDTH, lookup
from growfam.grow.importance import DEPTH_RULES, WIDTH_RULES
from growfam.grow.optim import OPTIMIZER_MODES
from growfam.grow.width import WIDTH_OPS


class FromKey:
    """A section whose YAML key `from` is its field `source` (`from` is a Python keyword)."""

    @classmethod
    def from_dict(cls, data):
        data = {} if data is None else dict(data) if isinstance(data, dict) else data
        if isinstance(data, dict) and "from" in data:
            data["source"] = data.pop("from")
        return super().from_dict(data)

    def to_dict(self) -> dict:
        out = super().to_dict()
        return {"from": out.pop("source"), **out}


@dataclass
class GrowthConfig(FromKey, Section):
    """The `growth:` section: how each member grows into the next.

    width / depth: growth operator names (growfam.grow registry). optimizer: "transfer" (AdamW
    moments follow the index maps) or "reset". schedule: "budget" grows after the stage's
    progressive budget (docs/concepts.md); "converged" grows once |slope| of the validation loss, fitted over the last
    `window` evaluations, falls below `slope` per step (Wang et al., "When and How to Grow?", ACML 2024, use 3e-6), and later
    stages take up the tokens left unspent so cumulative FLOPs still equal from-scratch cost.
    probe_tokens: validation tokens on which the growth report measures what expansion changed.
    from (`source` here): grow the next member from the stage's end ("decayed") or, with the
    lr: section's schedule wsd, from its stable checkpoint, the last step before the decay
    ("stable"): the decay is then the published member's branch, not the next stage's start.
    mask_steps: ramp length of the `masked` width operator, capped at the stage's steps so the
    masks fold away before the member is saved (None: a quarter of the stage's steps).
    """

    key: ClassVar[str] = "growth"
    source: str = "decayed"
    width: str = DEFAULT_WIDTH
    depth: str = DEFAULT_DEPTH
    optimizer: str = "transfer"
    seed: int = 0
    schedule: str = "budget"
    slope: float = 3e-6
    window: int = 5
    probe_tokens: int = 2048
    mask_steps: int | None = None

    def __post_init__(self) -> None:
        self.slope = as_number(self.slope, "growth.slope", above=0)
        for key in ("seed", "window", "probe_tokens", "mask_steps"):
            if getattr(self, key) is not None:
                setattr(self, key, as_int(getattr(self, key), f"growth.{key}"))
        as_choice(self.optimizer, OPTIMIZER_MODES, "growth.optimizer")
        as_choice(self.source, ("decayed", "stable"), "growth.from")
        as_choice(self.schedule, ("budget", "converged"), "growth.schedule")
        try:  # known names now: `growfam plan` refuses `width: foo` as `family run` does
            lookup(WIDTH_OPS, "width", self.width)
            lookup(DEPTH_OPS, "depth", self.depth)
        except ConfigError as err:
            raise ConfigError(f"growth: {err}") from None
        if self.window < 2:
            raise ConfigError("growth.window must be at least 2 evaluations")
        if self.source == "stable" and self.schedule == "converged":
            raise ConfigError("growth.from stable grows at the stable checkpoint; growth.schedule converged grows "
                              "where the loss flattens: choose one")

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["from"] == "decayed":  # the ledgers of families built before `from` existed stay equal
            del out["from"]
        return out


#: How a pruned member is recovered: distillation from its source, or cross-entropy.
RECOVERY = ("kd", "ce", "none")


@dataclass
class ShrinkConfig(FromKey, Section):
    """The `shrink:` section of a family built downward (`direction: shrink`).

    from (`source` here): each smaller member is pruned from the member above it ("previous",
    iterative, as Model Optimizer advises for cuts over 50%) or from the largest ("largest").
    width / depth: importance rule and depth rule (grow.importance). calibration: windows of
    the stage's seq_len, one at a time. recover: "kd" (distillation from the source) or "ce".
    tokens: each recovery's tokens as a share of the member's from-scratch budget D(N_i). lr:
    the recovery's peak and floor learning rates as a multiple of the stage's.
    """

    key: ClassVar[str] = "shrink"
    source: str = "previous"
    width: str = "importance"
    depth: str = "contiguous"
    calibration: int = 1024
    recover: str = "kd"
    tokens: float = 0.1
    lr: float = 1.0

    def __post_init__(self) -> None:
        as_choice(self.source, ("previous", "largest"), "shrink.from")
        as_choice(self.width, WIDTH_RULES, "shrink.width")
        as_choice(self.depth, DEPTH_RULES, "shrink.depth")
        as_choice(self.recover, RECOVERY[:2], "shrink.recover")
        self.calibration = as_int(self.calibration, "shrink.calibration", at_least=1)
        self.tokens = as_number(self.tokens, "shrink.tokens", above=0)
        self.lr = as_number(self.lr, "shrink.lr", above=0)

    def teacher(self, index: int, count: int) -> int:
        """The stage (0-based) member `index` of `count` is pruned from and learns from."""
        return index + 1 if self.source == "previous" else count - 1
