"""The learning-rate schedule (warm-up, then cosine, warmup-stable-decay or constant) and the
AdamW optimizer a run steps.

Weight decay applies to tensors with ndim >= 2, never to the RMSNorm gains; a config's betas,
eps and weight decay are (re)applied to an optimizer's groups after every state load.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from growfam.errors import ConfigError
from growfam.train.config import DEFAULT_MIN_LR_RATIO, TrainConfig


def lr_at(step: int, total_steps: int, max_lr: float, min_lr: float, warmup_steps: int,
          schedule: str = "cosine", decay_steps: int = 0, decay_shape: str = "linear") -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warm-up over `warmup_steps` (step 0 already gets max_lr / warmup_steps, never 0),
    then by `schedule`:
    - "cosine": from max_lr down to min_lr, reached exactly at the last step; min_lr after.
    - "wsd" (warmup-stable-decay; Hu et al., MiniCPM, arXiv 2404.06395; Hägele et al., arXiv
      2405.18392): max_lr until the last `decay_steps` steps, which fall to min_lr, reached
      exactly at the last step: the decay's k-th step (1-based) is at progress p = k /
      decay_steps, its LR min_lr + (max_lr − min_lr)·f(p), f = 1 − p (linear), ½(1 + cos πp)
      (cosine) or 1 − √p (sqrt, Hägele et al.'s "1-sqrt").
    - "constant": max_lr.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if schedule == "wsd":
        start = max(total_steps - decay_steps, warmup_steps)  # the first step of the decay
        if step < start:
            return max_lr
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
        fall = {"linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
                "sqrt": 1.0 - math.sqrt(progress)}[decay_shape]
        return min_lr + fall * (max_lr - min_lr)
    decay_steps = total_steps - 1 - warmup_steps
    progress = 1.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def lr_bounds(cfg: TrainConfig, scale: float = 1.0) -> tuple[float, float]:
    """(max_lr, min_lr) of the schedule with the peak multiplied by `scale` (the spike guard's
    rollbacks lower it); a ratio floor scales with it, an absolute one is capped by it."""
    max_lr = cfg.max_lr * scale
    if cfg.min_lr is not None:
        return max_lr, min(cfg.min_lr, max_lr)
    ratio = DEFAULT_MIN_LR_RATIO if cfg.min_lr_ratio is None else cfg.min_lr_ratio
    return max_lr, ratio * max_lr


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on tensors with ndim >= 2 (matrices, embeddings), not on gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
    return [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "name": "no_decay"},
    ]


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over `param_groups`; fused kernels where torch has them (CUDA and CPU, FSDP2's
    sharded parameters included)."""
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.max_lr, betas=cfg.betas,
                             eps=cfg.eps, fused=device.type in ("cuda", "cpu"))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set cfg's betas, eps and weight decay on every param group (decay only on the "decay"
    group, or on an unnamed group of matrices). load_state_dict replaces the groups' values
    with the saved ones, so this runs after every load. ConfigError for an unnamed group that
    mixes matrices and gains: weight decay cannot apply as configured."""
    for group in optimizer.param_groups:
        matrices = {p.ndim >= 2 for p in group["params"]}
        if "name" not in group and len(matrices) > 1:
            raise ConfigError("the optimizer has a param group mixing matrices and norm gains; build it with "
                              "growfam.train.make_optimizer (or param_groups) so weight decay skips the gains")
        decays = group["name"] == "decay" if "name" in group else matrices == {True}
        group.update(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay if decays else 0.0)


def check_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ConfigError(f"the optimizer does not hold the model's parameters {', '.join(missing[:3])}"
                          f"{' …' if len(missing) > 3 else ''}; build it from this model")
