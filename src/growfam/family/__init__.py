"""The family: its plan, the progressive pipeline that builds it, and its ledger.

The family YAML itself is read by growfam.config (FamilyConfig, load_family_config); this
package turns a FamilyConfig into budgets and members.

- `directory`: the family directory's layout (FamilyDirectory; LEDGER, MODES, GROWTH_REPORT):
  the only module that names its files and folders.
- `plan`: make_plan -> FamilyPlan / StagePlan: token budgets (Eq. 3-4), steps, FLOPs, peak LRs,
  GpuHours, VariantPlan (a distilled variant's tokens and FLOPs).
- `ledger`: family.json as typed records (Ledger, MemberEntry, EvalRecord, ConsistencySection,
  SpeculativeSection), validated on read: read_ledger, write_ledger, check_same_run.
- `members`: the members as the commands that use them see them (resolve_target -> Target,
  Member; LoadedMembers).
- `stage`: one stage: stage_train_config, ConvergenceStop, build_stage (grow or resume, train,
  publish the member, return its MemberEntry).
- `variants`: the distilled variants of a built family's members (distill: retro, draft):
  build_variants, check_variants, variant_train_config.
- `shrink`: `growfam shrink` as a function (shrink_directory, check_shrink, ShrinkOptions):
  importance, pruning, recovery by distillation or cross-entropy, into a shrink output.
- `downward`: the mode `shrink` of a family built downward (build_shrink_mode, check_shrink_family).
- `pipeline`: check_family, run_family (the stages in order, in each mode; the ledger; the lock).
- `memory`: fsdp_memory, the memory per GPU of training a member under FSDP2 (a planning
  estimate for `growfam plan --memory`).

Imports point one way inside: directory, plan and memory import nothing of family/; ledger
imports directory; members imports directory and ledger; stage imports directory, ledger and
plan; variants imports directory, ledger, plan and stage; shrink imports directory and stage;
downward imports directory, ledger, shrink and stage; pipeline imports all but members.
family/ may import the helpers (errors, checks, io, text, device, lock), model, data, grow,
train and config; eval, infer, report and the CLI
import it (tests/test_layout.py holds every package to the order in docs/architecture.md).
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
from growfam.family.pipeline import CheckedFamily, check_family, run_family
from growfam.family.stage import ConvergenceStop, stage_train_config
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
    "independent_tokens",
    "make_plan",
    "progressive_tokens",
    "read_ledger",
    "run_family",
    "stage_train_config",
    "write_ledger",
]
