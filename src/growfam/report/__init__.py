"""What growfam shows people: tables (and, to come, the family report with its figures).

- `numbers`: the one set of number formatters (si, sci, short, loss, hours).
- `tables`: every text table a command prints — the plan (`format_plan`) and the built
  family, Progressive vs Independent (`format_comparison`).

report/ may import errors, config and family/ (it reads plans and ledgers); config and family/
import only `report.numbers`. So this file imports no submodule: `from growfam.report.tables
import …`.
"""
