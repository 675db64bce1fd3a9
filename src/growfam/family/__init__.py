"""The family: its spec and plan, the progressive pipeline that builds it, and its ledger.

- `spec`: FamilySpec (members, token rule, count, batch, seq_len, LRPolicy), load_family_spec
  (a shipped family from growfam/configs, or a YAML path), shipped_families.
- `plan`: make_plan -> FamilyPlan / StagePlan: token budgets (Eq. 3-4), steps, FLOPs, peak LRs,
  GpuHours.
- `ledger`: family.json (LEDGER, MODES): read_ledger, write_ledger, check_ledger.
- `pipeline`: GrowthOptions, DataOptions, stage_train_config, ConvergenceStop, check_family,
  run_family, ensure_dataset.

Imports point one way: spec <- plan; pipeline imports spec, plan and ledger. family/ may
import errors, io, model, data, grow, train and report.numbers (its tables live in
report/tables.py, which imports family/); nothing else imports family/ but the CLI and report/.
"""

from growfam.family.ledger import LEDGER, MODES, check_ledger, read_ledger, write_ledger
from growfam.family.pipeline import (
    GROWTH_REPORT,
    PLANNED,
    CheckedFamily,
    ConvergenceStop,
    DataOptions,
    GrowthOptions,
    check_family,
    ensure_dataset,
    run_family,
    stage_train_config,
)
from growfam.family.plan import (
    FamilyPlan,
    GpuHours,
    StagePlan,
    independent_tokens,
    make_plan,
    progressive_tokens,
)
from growfam.family.spec import (
    CHINCHILLA_TOKENS_PER_PARAM,
    CONFIG_DIR,
    COUNTS,
    EXTRA_SECTIONS,
    FamilySpec,
    LRPolicy,
    load_family_spec,
    shipped_families,
)

__all__ = [
    "CHINCHILLA_TOKENS_PER_PARAM",
    "CONFIG_DIR",
    "COUNTS",
    "EXTRA_SECTIONS",
    "GROWTH_REPORT",
    "LEDGER",
    "MODES",
    "PLANNED",
    "CheckedFamily",
    "ConvergenceStop",
    "DataOptions",
    "FamilyPlan",
    "FamilySpec",
    "GpuHours",
    "GrowthOptions",
    "LRPolicy",
    "StagePlan",
    "check_family",
    "check_ledger",
    "ensure_dataset",
    "independent_tokens",
    "load_family_spec",
    "make_plan",
    "progressive_tokens",
    "read_ledger",
    "run_family",
    "shipped_families",
    "stage_train_config",
    "write_ledger",
]
