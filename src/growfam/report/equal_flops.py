"""FLOPs to equal loss, the paper's headline (§4.3: Progressive reaches Independent's loss
with 26% fewer FLOPs at 2x Chinchilla, 31% with the max-LR adjustment).

For member i: the cumulative FLOPs at which the progressive curve (its stage, from the growth
point to its published model; see `curves`) first reaches the validation loss of the model the
independent member i published (its last evaluation's, or its averaged checkpoints'), linearly
interpolated between evaluations, against what the independent family spends up to member i
(Σ_{j<=i} FLOPs of independent member j). When the stage never gets there: "not reached", with
the gap left at its end.
A family built downward (shrink) builds its largest member first: what the independent family
spends to have the members built so far is then Σ_{j>=i} (`independent_cost`), so the largest
member, trained from scratch in both, saves nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from growfam.report.curves import MemberCurve


@dataclass(frozen=True)
class EqualLoss:
    """One member's comparison. FLOPs are 6ND; losses nats."""

    member: str
    target_loss: float  # the validation loss of the independent member's published model
    independent_flops: float  # the independent family's cumulative FLOPs through this member
    progressive_flops: float | None  # where the progressive curve first reaches target_loss; None: never
    gap: float | None  # not reached: the progressive member's published loss − target_loss
    stage_end_flops: float  # the progressive family's cumulative FLOPs at the end of this stage

    @property
    def saving(self) -> float | None:
        """1 − progressive / independent FLOPs (0.26 is the paper's 26% fewer), None when not reached."""
        return None if self.progressive_flops is None else 1 - self.progressive_flops / self.independent_flops

    @property
    def saving_at_end(self) -> float:
        """The saving had the loss been reached only at the end of the stage (the plan's saving
        through this member, by Eq. 4)."""
        return 1 - self.stage_end_flops / self.independent_flops


def first_crossing(points: list[tuple[float, float]], target: float) -> float | None:
    """The first x at which the piecewise-linear curve through `points` (x, loss) gets down to
    `target`: the first point at or below it, or the interpolation between it and the point
    before. None when no point gets there."""
    for i, (x, y) in enumerate(points):
        if y <= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            return x0 + (y0 - target) / (y0 - y) * (x - x0)
    return None


def flops_to_equal_loss(progressive: list[MemberCurve], independent: list[MemberCurve],
                        independent_cost: dict[str, float] | None = None) -> list[EqualLoss]:
    """Per member present in both modes with a validation curve, in the independent order.
    independent_cost: member name -> what the independent family spends to have it, when that
    is not its curve's cumulative FLOPs (Σ_{j<=i}; a downward family's is Σ_{j>=i})."""
    by_name = {c.name: c for c in progressive}
    results = []
    for ind in independent:
        prog = by_name.get(ind.name)
        if prog is None or not ind.val or not prog.val:
            continue
        target = ind.final_loss
        reached = first_crossing(prog.val_by_flops(), target)
        gap = None if reached is not None else prog.final_loss - target
        cost = ind.cum_flops if independent_cost is None else independent_cost[ind.name]
        results.append(EqualLoss(ind.name, target, cost, reached, gap, prog.cum_flops))
    return results
