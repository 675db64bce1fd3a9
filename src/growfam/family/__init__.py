"""The family: its plan, the progressive pipeline that builds it, and its ledger.

The family YAML itself is read by growfam.config (FamilyConfig, load_family_config); this
package turns a FamilyConfig into budgets and members.

- `directory`: the family directory's layout (FamilyDirectory; LEDGER, MODES, GROWTH_REPORT):
  the only module that names its files and folders.
- `plan`: make_plan -> FamilyPlan / StagePlan: token budgets (Eq. 3-4), steps, FLOPs, peak LRs,
  GpuHours.
- `ledger`: family.json as typed records (Ledger, MemberEntry, EvalRecord, ConsistencySection,
  SpeculativeSection), validated on read: read_ledger, write_ledger, check_same_run.
- `members`: the members as the commands that use them see them (resolve_target -> Target,
  Member; LoadedMembers).
- `pipeline`: stage_train_config, ConvergenceStop, check_family, run_family, dataset_dir,
  ensure_dataset.

Imports point one way: pipeline imports plan and ledger. family/ may import errors, checks,
io, config, model, data, grow, train and report.numbers (its tables live in report/tables.py,
which imports family/); nothing else imports family/ but the CLI and report/.
"""

from growfam.family.directory import GROWTH_REPORT, LEDGER, MODES, FamilyDirectory
from growfam.family.ledger import (
    ConsistencySection,
    EvalRecord,
    Ledger,
    MemberEntry,
    SpeculativeSection,
    read_ledger,
    write_ledger,
)
from growfam.family.pipeline import (
    CheckedFamily,
    ConvergenceStop,
    check_family,
    dataset_dir,
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

__all__ = [
    "GROWTH_REPORT",
    "LEDGER",
    "MODES",
    "CheckedFamily",
    "ConsistencySection",
    "EvalRecord",
    "Ledger",
    "MemberEntry",
    "SpeculativeSection",
    "FamilyDirectory",
    "ConvergenceStop",
    "FamilyPlan",
    "GpuHours",
    "StagePlan",
    "check_family",
    "dataset_dir",
    "ensure_dataset",
    "independent_tokens",
    "make_plan",
    "progressive_tokens",
    "read_ledger",
    "run_family",
    "stage_train_config",
    "write_ledger",
]
