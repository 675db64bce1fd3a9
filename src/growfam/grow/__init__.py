"""Growth operators: expand a trained Llama in width and depth (docs/concepts.md lists them).

    grown, optimizer, report = expand(model, "paper-2b", width="aki", depth="stack",
                                      optimizer=adamw, probe=tokens)
    print(report)

Operators are looked up by name in WIDTH_OPS and DEPTH_OPS (the CLI and the family pipeline
use the names). A model grown with width="masked" carries masks as forward hooks the model
does not know about; the trainer calls `advance_masks(model)` (through its MaskRamp callback)
after every optimizer step until they fold away and the hooks are removed.

Modules: maps (index maps), width (width operators, growing one tensor), depth (depth
operators), growth (a plan applied to named tensors), masks (the masked ramp, as hooks), optim
(AdamW state), report (GrowthReport), expansion (`expand`), multi (`combined_config`,
`expand_from`), directories (`expand_directories`: `growfam expand` on saved models), config
(GrowthConfig, the family YAML's `growth:` section). The inverse, shrinking: prune (PruneMaps,
`prune`: slice a model down to kept channels, GQA groups, neurons and layers), importance
(activation, magnitude and random importance, `measure` by rule name; `select`: the PruneMaps
for a smaller shape), optim's `prune_adamw` (the moments sliced alike). `growfam shrink`, which
trains as well, is family/shrink.py.

grow/ may import the top-level helpers and model/; nothing of data/, train/, growfam.config or
family/.
"""

from growfam.grow.depth import DEPTH_OPS
from growfam.grow.directories import expand_directories
from growfam.grow.expansion import expand
from growfam.grow.growth import GrowthPlan
from growfam.grow.masks import MaskState, advance_masks, fold_masks, mask_state
from growfam.grow.multi import COMBINE_MODES, combined_config, expand_from
from growfam.grow.importance import (DEPTH_RULES, WIDTH_RULES, Importance, activation_importance,
                                     magnitude_importance, measure, random_importance, select)
from growfam.grow.optim import OPTIMIZER_MODES, prune_adamw
from growfam.grow.prune import PruneMaps, prune
from growfam.grow.report import GrowthReport
from growfam.grow.width import WIDTH_OPS

__all__ = [
    "COMBINE_MODES",
    "DEPTH_RULES",
    "WIDTH_RULES",
    "Importance",
    "PruneMaps",
    "activation_importance",
    "magnitude_importance",
    "measure",
    "prune",
    "prune_adamw",
    "random_importance",
    "select",
    "DEPTH_OPS",
    "GrowthPlan",
    "GrowthReport",
    "MaskState",
    "OPTIMIZER_MODES",
    "WIDTH_OPS",
    "advance_masks",
    "combined_config",
    "expand",
    "expand_directories",
    "expand_from",
    "fold_masks",
    "mask_state",
]
