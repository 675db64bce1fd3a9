"""A family's loss curves: each member's metrics.jsonl read into train and validation points,
placed on the family's cumulative-FLOPs axis.

A run's `eval` records carry a step; its tokens are step × tokens per step and its FLOPs
6·N·tokens (the ledger's FLOPs / tokens, so the last evaluation lands on the ledger's value).
A progressive stage starts where the earlier stages ended: its FLOPs are offset by their
cumulative FLOPs, and its curve begins at the growth point, whose loss is the previous
member's final validation loss plus what the expansion changed on the probe batch (the growth
report's Δloss; the probe batch is validation tokens too) — or, grown from the stable
checkpoint before a decay (growth.from stable), the grown model's own probe loss. An
independent member starts at 0.
A member published as the mean of its last checkpoints (train `average:`) has a validation
loss of its own that no evaluation of the run logged: it stands at the run's end, after the
last evaluation (`published`). The next stage grows from the run's last state, not from the
mean, so its growth point is that state's loss plus Δloss.
A member of a family built downward (mode shrink) starts where its source's chain ended: its
recovery run is offset by the FLOPs spent to have its source.
A resumed or rolled-back run logged some steps twice: the later records replace the earlier.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from growfam.errors import ConfigError
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import Ledger
from growfam.train.metrics import read_metrics

#: Where a member's run lives in a family directory.
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class MemberCurve:
    """One member's run. Points are (tokens of this run, loss in nats), in step order."""

    mode: str
    name: str
    offset: float  # FLOPs spent before this run: the earlier progressive stages', else 0
    flops_per_token: float  # 6·N of its counted N, plus a teacher's FLOPs spread over its tokens
    cum_flops: float  # what the mode's family spent through this member (independent: Σ_{j<=i})
    train: list[tuple[float, float]]
    val: list[tuple[float, float]]
    start: tuple[float, float] | None = None  # growth point (FLOPs, loss); progressive stages 2..n
    published: float | None = None  # the published model's loss when not the last evaluation's (averaged)

    def flops(self, tokens: float) -> float:
        """Cumulative FLOPs of the family after `tokens` tokens of this run."""
        return self.offset + self.flops_per_token * tokens

    def val_by_flops(self) -> list[tuple[float, float]]:
        """The validation curve as (cumulative FLOPs, loss), from the growth point when there is
        one, to the published model (at the last evaluation's FLOPs) when it was averaged."""
        end = [(self.flops(self.val[-1][0]), self.published)] if self.val and self.published is not None else []
        return ([self.start] if self.start else []) + [(self.flops(t), v) for t, v in self.val] + end

    @property
    def final_loss(self) -> float:
        """The validation loss of the model the run published (the last evaluation's, or the
        averaged model's). Needs at least one evaluation."""
        return self.val[-1][1] if self.published is None else self.published


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_points(path: Path, tokens_per_step: float) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(train, val) points of a metrics.jsonl as (tokens, loss); ConfigError naming the file
    when it cannot be read. Non-finite losses (logged as null) are left out."""
    try:
        records = read_metrics(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable metrics file ({err})") from None
    series: dict[str, dict[int, float]] = {"train": {}, "eval": {}}
    for record in records:
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ConfigError(f"{path}: a record without an integer step: {str(record)[:80]}")
        event = record.get("event")
        if event in ("resume", "rollback"):  # the run went back to `step`: what came after is replaced
            for points in series.values():
                for later in [s for s in points if s > step]:
                    del points[later]
        elif event in series:
            value = _number(record.get("loss" if event == "train" else "val_loss"))
            if value is not None:
                series[event][step] = value
    train, val = ([(step * tokens_per_step, v) for step, v in sorted(series[key].items())] for key in ("train", "eval"))
    return train, val


def member_curves(family_dir: Path, ledger: Ledger, mode: str) -> tuple[list[MemberCurve], list[str]]:
    """The curves of `mode`'s finished members, in order, and a note per member whose run
    cannot be drawn (no metrics.jsonl, no steps)."""
    curves, missing, previous = [], [], None
    last_state = None  # the previous run's last evaluated loss: the state the next stage grows from
    offset = spent = 0.0  # the progressive stage's start; the mode's FLOPs through this member
    for entry in ledger.members(mode):
        if not entry.done:
            missing.append(f"{mode}/{entry.name} has not finished")
            break
        spent = entry.cum_flops if mode != "independent" else spent + entry.spent_flops
        if mode == "shrink":  # a pruned member's run starts where its source's chain ended
            offset = entry.cum_flops - entry.spent_flops
        path = FamilyDirectory(family_dir).training_run(mode, entry.name, entry.shrink is not None) / METRICS
        steps = entry.steps
        grown_from, last_state = last_state, None
        if not path.is_file():
            missing.append(f"{mode}/{entry.name}: no {path.relative_to(family_dir)}")
        elif not isinstance(steps, int) or steps <= 0 or entry.tokens <= 0:
            missing.append(f"{mode}/{entry.name}: the ledger records no steps")
        else:
            train, val = run_points(path, entry.tokens / steps)
            start = None
            if mode == "progressive" and previous is not None and previous.val_loss is not None:
                probe = (entry.growth or {}).get("probe") or {}
                grown_from_stable = (previous.growth_point or {}).get("from") == "stable"
                # grown from the stable checkpoint, not from the published (decayed) member: the
                # probe's own loss of the grown model is the start, not the member's plus Δ
                start = (offset, _number(probe.get("loss_grown")) if grown_from_stable and "loss_grown" in probe
                         else (grown_from if grown_from is not None else previous.val_loss)
                         + (_number(probe.get("dloss")) or 0.0))
            published = _number(entry.val_loss)
            if not val or published is None or abs(published - val[-1][1]) <= 1e-12:
                published = None  # the published model is the last evaluated one
            curves.append(MemberCurve(mode, entry.name, offset, entry.spent_flops / entry.tokens, spent,
                                      train, val, start, published))
            last_state = val[-1][1] if val else None
        previous = entry
        offset = spent if mode == "progressive" else 0.0
    return curves, missing
