"""What growfam shows people: tables (and, to come, the family report with its figures).

- `numbers`: the one set of number formatters (si, sci, short, loss, hours).
- `tables`: every text table a command prints — the plan (`format_plan`), its memory per GPU
  (`format_memory`) and the built family, Progressive vs Independent (`format_comparison`).

report/ may import errors, model, config, family/ (it reads plans and ledgers) and
train.memory; config and family/
import only `report.numbers`. So this file imports no submodule: `from growfam.report.tables
import …`.
"""
