"""What growfam shows people: tables, and the family report with its figures.

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

report/ is the top stage: it may import every package below it (the numbers and the text
table come from growfam.text), and nothing but cli/ imports it. This file imports no
submodule: `from growfam.report.run import …`.
"""
