"""AdamW state across a growth or a pruning: the moments follow the parameters' index maps.

Copied units inherit their source's moments, new (filled or unread) units start at zero, and
every tensor keeps its source's step count. Split columns keep their moments unscaled; rows of
units that readers split c ways take m/c and v/c² — under function preservation that is
exactly how the grown model's gradients relate to the source's (width.py explains). Inserted
layers of `stack` / `interleave` are copies and inherit; those of identity / redundant / zero /
random are new and start at zero. `reset` gives a fresh AdamW with the same hyperparameters.

Pruning (`prune_adamw`) slices the moments like the weights. A norm gain multiplied by
c = √(d/d') has its gradient divided by c, so its m is divided by c and its v by c².
"""

from __future__ import annotations

import torch

from growfam.errors import ConfigError
from growfam.grow.growth import GrowthPlan
from growfam.grow.prune import PruneMaps, norm_gain, slice_tensors
from growfam.model import Llama

OPTIMIZER_MODES = ("transfer", "reset")
_MOMENTS = {"exp_avg": "m", "exp_avg_sq": "v", "max_exp_avg_sq": "v"}


def check_optimizer(optimizer: torch.optim.Optimizer, mode: str) -> None:
    """ConfigError unless `optimizer` is an AdamW and `mode` a known optimizer mode."""
    if not isinstance(optimizer, torch.optim.AdamW):
        raise ConfigError(f"optimizer state transfer supports torch.optim.AdamW, "
                          f"got {type(optimizer).__name__}")
    if mode not in OPTIMIZER_MODES:
        raise ConfigError(f"unknown optimizer mode {mode!r}; known: {', '.join(OPTIMIZER_MODES)}")


def grow_adamw(optimizer: torch.optim.AdamW, source: Llama, grown: Llama, plan: GrowthPlan,
               mode: str = "transfer") -> torch.optim.AdamW:
    """A new AdamW over `grown`'s parameters with `optimizer`'s param groups (a grown tensor
    joins the group of the tensor it grew from) and, for mode "transfer", its grown state."""
    check_optimizer(optimizer, mode)
    src_params = dict(source.named_parameters())
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    members: list[list[torch.nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for name, p in grown.named_parameters():
        group = group_of.get(id(src_params[plan.source_name(name)]))
        if group is not None:  # a tensor the source optimizer did not train stays untrained
            members[group].append(p)
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
              for g, ps in zip(optimizer.param_groups, members) if ps]
    new = torch.optim.AdamW(groups)
    if mode == "reset" or not optimizer.state:
        return new

    def moment(kind: str):
        def get(name: str) -> torch.Tensor:
            state = optimizer.state.get(src_params[name], {})
            return state[kind] if kind in state else torch.zeros_like(src_params[name])
        return get

    kinds = {k for state in optimizer.state.values() for k in state if k in _MOMENTS}
    trained = {id(p) for g in groups for p in g["params"]}
    for name, p in grown.named_parameters():
        state = optimizer.state.get(src_params[plan.source_name(name)], {})
        if id(p) in trained and "step" in state:
            new.state[p]["step"] = state["step"].clone()
    for kind in sorted(kinds):
        tensors, _ = plan.apply(moment(kind), _MOMENTS[kind])
        for name, p in grown.named_parameters():
            if p in new.state:
                new.state[p][kind] = tensors[name]
    return new


def prune_adamw(optimizer: torch.optim.AdamW, source: Llama, pruned: Llama, maps: PruneMaps,
                rescale_norms: bool = True) -> torch.optim.AdamW:
    """A new AdamW over `pruned`'s parameters (`prune(source, maps, rescale_norms)`) with
    `optimizer`'s param groups and hyperparameters, its moments sliced by `maps` and its step
    counts kept (see the module docstring for the norms)."""
    check_optimizer(optimizer, "transfer")
    src_params = dict(source.named_parameters())
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}

    def source_name(name: str) -> str:  # layers.{new}.x of the pruned model came from layers.{old}.x
        if not name.startswith("layers."):
            return name
        _, new, rest = name.split(".", 2)
        return f"layers.{maps.layers[int(new)]}.{rest}"

    members: list[list[torch.nn.Parameter]] = [[] for _ in optimizer.param_groups]
    for name, p in pruned.named_parameters():
        group = group_of.get(id(src_params[source_name(name)]))
        if group is not None:
            members[group].append(p)
    new = torch.optim.AdamW([{**{k: v for k, v in g.items() if k != "params"}, "params": ps}
                             for g, ps in zip(optimizer.param_groups, members) if ps])
    gain = norm_gain(source.cfg, maps, rescale_norms)
    trained = {id(p) for g in new.param_groups for p in g["params"]}
    kinds = sorted({k for state in optimizer.state.values() for k in state if k in _MOMENTS})
    for kind in kinds:
        moments = {name: optimizer.state.get(p, {}).get(kind, torch.zeros_like(p)) for name, p in src_params.items()}
        sliced = slice_tensors(moments, source.cfg, maps, gain ** (-1 if _MOMENTS[kind] == "m" else -2))
        for name, p in pruned.named_parameters():
            if id(p) in trained:
                new.state[p][kind] = sliced[name].clone()
    for name, p in pruned.named_parameters():
        state = optimizer.state.get(src_params[source_name(name)], {})
        if "step" in state and id(p) in trained:
            new.state[p]["step"] = state["step"].clone()
    return new
