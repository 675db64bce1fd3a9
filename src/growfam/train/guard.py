"""The loss-spike guard (paper section 4.4 and Appendix C): skip, roll back, or stop.

SpikeGuard decides for each optimizer step whether its update is applied; its state is saved
in checkpoints so a resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from growfam.train.parallel import local


#: The running mean is an EMA of accepted losses with this beta (about the last 10 steps).
SPIKE_EMA_BETA = 0.9


@dataclass
class SpikeGuard:
    """Decides for each optimizer step whether its update is applied.

    A step is a spike when its loss or gradient norm is NaN/inf or its loss exceeds `factor` ×
    the baseline. The baseline starts at `baseline` (train() gives ln(vocab_size)) and then is
    the lowest running mean of accepted losses reached so far. Why: an EMA of accepted losses
    follows a blow-up that rises less than `factor` per step (8 -> 3000 went through unflagged),
    while the lowest mean reached cannot rise; and a freshly initialised model predicts about
    uniformly, so ln(V) bounds a sane starting loss and arms the guard from step 0.

    A spike's update is skipped. `patience` spikes within `window` steps ask for a rollback:
    the peak LR scale drops by `lr_factor`. The rollback after `max_rollbacks` rollbacks in a
    row (none of which the run got past: accepted the step it happened at) is refused:
    "diverged".
    """

    # settings: TrainConfig's spike_factor, spike_patience, spike_window, spike_lr_factor and
    # max_rollbacks (their defaults live there only)
    factor: float | None
    patience: int
    window: int
    lr_factor: float
    max_rollbacks: int
    # state, saved in checkpoints
    baseline: float | None = None
    mean: float | None = None
    accepted: int = 0
    recent: list[int] = field(default_factory=list)
    lr_scale: float = 1.0
    spikes: int = 0
    rollbacks: int = 0
    streak: int = 0  # rollbacks in a row without accepting step `rolled_back_at` or a later one
    rolled_back_at: int = -1  # the furthest step (0-based) a rollback of the streak happened at

    STATE = ("baseline", "mean", "accepted", "recent", "lr_scale", "spikes", "rollbacks", "streak",
             "rolled_back_at")

    def check(self, step: int, loss: float, grad_norm: float) -> str:
        """"ok" (apply the update), "skip", "rollback" (skip and reload the last checkpoint) or
        "diverged" (stop the run). `step` is the 0-based index of the step."""
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite and not (self.factor is not None and self.baseline is not None
                           and loss > self.factor * self.baseline):
            self.mean = loss if self.mean is None else SPIKE_EMA_BETA * self.mean + (1 - SPIKE_EMA_BETA) * loss
            self.baseline = self.mean if self.baseline is None else min(self.baseline, self.mean)
            self.accepted += 1
            if step >= self.rolled_back_at:
                self.streak = 0
            return "ok"
        self.spikes += 1
        self.recent = [s for s in self.recent if s > step - self.window] + [step]
        if self.patience and len(self.recent) >= self.patience:
            return self.rollback(step)
        return "skip"

    def rollback(self, step: int) -> str:
        """Ask to go back to the last checkpoint from step `step`: "rollback" (the LR scale
        drops) or, once `max_rollbacks` in a row did not get the run past them, "diverged"."""
        self.recent = []
        if self.streak >= self.max_rollbacks:
            return "diverged"
        self.streak += 1
        self.rolled_back_at = max(self.rolled_back_at, step)
        self.lr_scale *= self.lr_factor
        self.rollbacks += 1
        return "rollback"

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; keys it lacks (older checkpoints) keep their values here.
        TypeError for a value of the wrong kind, so a damaged checkpoint fails here, not later."""
        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for k in self.STATE:
            value = state.get(k, getattr(self, k))
            if k == "recent":
                ok = isinstance(value, list) and all(type(s) is int for s in value)
            elif k in ("baseline", "mean", "lr_scale"):
                ok = number(value) or (value is None and k != "lr_scale")
            else:
                ok = type(value) is int
            if not ok:
                raise TypeError(f"spike guard {k} is {value!r}")
            setattr(self, k, value)


def nonfinite_tensors(model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
    """Names of the model's parameters (and "optimizer KEY of NAME" entries) holding NaN/inf
    (in this rank's shards of a sharded model: see Parallelism.union)."""
    tensors = list(model.named_parameters()) if model is not None else []
    names = {id(p): n for n, p in tensors}
    if optimizer is not None:
        tensors += [(f"optimizer {key} of {names.get(id(p), '?')}", v) for p, state in optimizer.state.items()
                    for key, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(local(t)).all() for _, t in tensors]).tolist()  # one device sync
    return [n for (n, _), ok in zip(tensors, finite) if not ok]
