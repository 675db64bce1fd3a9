"""What growfam shows people: tables, and the family report with its figures.

- `numbers`: the one set of number formatters (si, sci, short, loss, hours).
- `tables`: every text table a command prints — the plan (`format_plan`), its memory per GPU
  (`format_memory`), the built family, Progressive vs Independent (`format_comparison`) — and
  their rows (`plan_rows`, `comparison_rows`, `speculative_rows`) for the report's Markdown.
- `curves`: each member's metrics.jsonl as train / validation points on the family's
  cumulative-FLOPs axis (MemberCurve, member_curves).
- `equal_flops`: FLOPs to equal loss, the paper's headline (EqualLoss, flops_to_equal_loss).
- `source`: a family directory as the report reads it (FamilySource, load_families).
- `figures`: the PNG figures (matplotlib's Agg canvas): Figure 2, training curves, the
  FLOPs-to-equal-loss bars.
- `markdown`: REPORT.md's sections, and the headline lines.
- `run`: `growfam report` as a function (write_report).

report/ may import errors, checks, io, model, config, family/, train.metrics (reading
metrics.jsonl), train.memory and eval.tables (the rows of Tables 1/2 and 4); config, family/
and eval/ import only `report.numbers` and `report.tables`. So this file imports no
submodule: `from growfam.report.run import …`.
"""
