"""REPORT.md: the headline, Figure 2, FLOPs to equal loss, Tables 1/2, the training curves,
Tables 4 and 5, the plan and the growth steps of one family, or of several side by side.

The tables are the rows the text tables print (report/tables.py, eval/tables.py) rendered as
Markdown. A section whose data the family lacks says which command produces it. `FIGURES`
names the figure files each family's sections link to; report/run.py draws them.
"""

from __future__ import annotations

from typing import Sequence

from growfam.errors import ConfigError
from growfam.eval.tables import consistency_note, consistency_rows, eval_note, eval_rows
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import MemberEntry
from growfam.text import loss, sci
from growfam.report.source import FamilySource
from growfam.report.distillation import VARIANTS_NOTE, inherit_line, variant_rows
from growfam.report.posttrain import data_lines, length_lines, posttrain_rows
from growfam.report.tables import built_flops, comparison_rows, family_flops, plan_rows, speculative_rows

#: The figures of one family's sections: figure2, training curves, FLOPs to equal loss.
FIGURES = {"figure2": "figure2.png", "training": "training-curves.png", "equal_flops": "equal-flops.png",
           "posttrain": "posttrain-curves.png"}
TITLE = "# growfam report"


def figure_names(source: FamilySource, prefix: bool) -> dict[str, str]:
    """The FIGURES the family's data can draw, prefixed by its slug when the report holds
    several families."""
    keys = ({"figure2", "training"} if any(source.curves.values()) else set()) | \
        ({"equal_flops"} if source.equal_loss() else set()) | \
        ({"posttrain"} if source.ledger.extra.get("posttrain") else set())
    return {key: f"{source.slug}-{name}" if prefix else name for key, name in FIGURES.items() if key in keys}


def markdown_table(rows: Sequence[Sequence[str]], groups: Sequence[tuple[int, int, str]] = ()) -> list[str]:
    """rows[0] is the header; a column group's label goes before each header cell it spans.
    A row whose cells after the first are all empty is a heading inside the table (bold)."""
    header = list(rows[0])
    for first, last, label in groups:
        for c in range(first, last + 1):
            header[c] = f"{label} {header[c]}"

    def line(cells):
        return "| " + " | ".join(str(c).strip().replace("|", "\\|") for c in cells) + " |"

    out = [line(header), "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows[1:]:
        heading = len(row) > 1 and not any(row[1:])
        out.append(line([f"**{row[0]}**", *row[1:]] if heading else row))
    return out


def _run(command: str, source: FamilySource) -> str:
    return f"run `growfam {command}`".replace("DIR", str(source.path))


def _build_command(source: FamilySource, mode: str) -> str:
    return _run(f"family run {source.name} --mode {mode} --out DIR", source) + \
        f" (`{source.name}` or the family's YAML)"


def _no_curves(source: FamilySource, modes: Sequence[str] | None = None) -> str:
    """Why `modes` (default: the built mode and independent) have no curve to draw: not built
    (and the command that builds them), or their runs' metrics are gone."""
    modes = modes or (source.built, "independent")
    unbuilt = [m for m in modes if not source.members(m)]
    if unbuilt:
        mode = unbuilt[0] if len(unbuilt) == 1 else "both"
        return f"No {' or '.join(unbuilt)} member built: " + _build_command(source, mode) + "."
    return "No training metrics to draw: " + "; ".join(source.missing) + "."


# --------------------------------------------------------------------------------------------
# Headline
# --------------------------------------------------------------------------------------------


def _headline_member(source: FamilySource) -> tuple[MemberEntry | None, MemberEntry | None]:
    """The ledger entries (built mode, independent) of the member the headline compares, None
    where it is missing: the one the family builds last — the largest of a grown family, the
    smallest of one built downward (whose largest is the same from-scratch run in both modes)."""
    prog, ind = source.members(source.built), source.members("independent")
    members = prog or ind
    name = None if not members else members[0].name if source.built == "shrink" else members[-1].name

    def find(members):
        return next((m for m in members if m.name == name), None)

    return find(prog), find(ind)


def _headline_equal_loss(source: FamilySource):
    """The headline member's EqualLoss, or None when it cannot be computed."""
    results, (prog, _) = source.equal_loss(), _headline_member(source)
    return next((r for r in results if prog is not None and r.member == prog.name), None)


def _saved(totals: tuple[float, float]) -> str:
    return f"{100 * (1 - totals[0] / totals[1]):.1f}%"


def equal_loss_text(r, built: str = "progressive") -> str:
    """An EqualLoss in words: where the loss was reached and the saving, or the gap."""
    if r.saving is None:
        return f"not reached (the {built} member ended {r.gap:+.4f} nats above it)"
    return (f"{sci(r.progressive_flops)} FLOPs, {100 * r.saving:.1f}% fewer than the independent family's "
            f"{sci(r.independent_flops)} ({100 * r.saving_at_end:.1f}% had it taken the whole stage)")


def headline(source: FamilySource) -> list[str]:
    """The family's headline numbers, a line each: family FLOPs, the headline member's loss in
    both modes (the largest; built downward, the smallest), and its FLOPs to equal loss."""
    lines = []
    if (totals := family_flops(source.ledger)) is not None:
        lines.append(f"family FLOPs (6ND): {source.built} {sci(totals[0])}, independent {sci(totals[1])} "
                     f"({_saved(totals)} saved)")
    prog, ind = _headline_member(source)
    if prog is not None and ind is not None and prog.val_loss is not None and ind.val_loss is not None:
        lines.append(f"{prog.name} val loss: {source.built} {loss(prog.val_loss)}, independent "
                     f"{loss(ind.val_loss)} (Δ {prog.val_loss - ind.val_loss:+.4f})")
    if (r := _headline_equal_loss(source)) is not None:
        lines.append(f"{r.member} FLOPs to equal loss (the independent {r.member}'s final val loss "
                     f"{loss(r.target_loss)}): {equal_loss_text(r, source.built)}")
    if totals is None and (built := built_flops(source.ledger)) is not None:
        lines.append(f"family FLOPs (6ND): {source.built} {sci(built)} (no independent baseline: "
                     + _build_command(source, "independent") + ")")
    return lines or ["no member built in both modes yet: " + _build_command(source, "both")]


def _lr_text(lr: dict) -> str:
    peak = f"linear {lr.get('start'):g} → {lr.get('end'):g} (by {lr.get('by', 'index')})" \
        if lr.get("policy") == "linear" else f"{lr.get('policy', '?')} {lr.get('max', '')}"
    if lr.get("schedule", "cosine") == "cosine":
        return peak
    decay = f" (decay {lr.get('decay'):g}, {lr.get('decay_shape')})" if lr["schedule"] == "wsd" else ""
    return f"{peak}, {lr['schedule']}{decay}"


_SIDE_BY_SIDE = ("family", "built", "growth or pruning", "max LR, schedule", "family FLOPs, built",
                 "family FLOPs independent", "family FLOPs saved", "member (built last)", "its val loss, built",
                 "its val loss, independent", "its FLOPs to equal loss")


def _headline_cells(source: FamilySource) -> list[str]:
    """One family's column of the side-by-side table, in _SIDE_BY_SIDE's order."""
    totals, (prog, ind), r = family_flops(source.ledger), _headline_member(source), _headline_equal_loss(source)
    growth, shrink = source.ledger.growth, source.ledger.plan.get("shrink") or {}
    how = f"{shrink.get('width')} / {shrink.get('depth')}, from {shrink.get('from')}, {shrink.get('recover')}" \
        if source.built == "shrink" else f"{growth.get('width')} / {growth.get('depth')}" + \
        (", from the stable checkpoint" if growth.get("from") == "stable" else "")
    return [source.name, source.built, how,
            _lr_text(source.ledger.plan.get("lr", {})),
            *((sci(totals[0]), sci(totals[1]), _saved(totals)) if totals
              else (sci(built) if (built := built_flops(source.ledger)) is not None else "-", "-", "-")),
            (prog or ind).name if (prog or ind) else "-", loss(prog and prog.val_loss), loss(ind and ind.val_loss),
            "-" if r is None else f"{100 * r.saving:.1f}% fewer" if r.saving is not None
            else f"not reached ({r.gap:+.4f} nats)"]


def side_by_side(sources: list[FamilySource]) -> list[str]:
    """The headline figures of several families as one table, a column per family."""
    columns = [_headline_cells(s) for s in sources]
    return markdown_table([["", *(s.label for s in sources)]]
                          + [[label, *(c[i] for c in columns)] for i, label in enumerate(_SIDE_BY_SIDE)])


# --------------------------------------------------------------------------------------------
# One family's sections
# --------------------------------------------------------------------------------------------

FIGURE2_CAPTION = (
    "Validation loss (nats, on the trainer's validation windows) against cumulative training FLOPs "
    "(6ND, log scale). Solid lines: the progressive family, each stage drawn from the FLOPs all "
    "stages before it spent, starting at its growth point (◇: the previous member's final loss plus "
    "what the expansion changed on the probe batch; the thin line joins it to where the previous "
    "stage ended). Dashed lines: each independent member from scratch, from 0 FLOPs. By Eq. 4 a "
    "progressive member ends at the FLOPs its independent twin ends at, so the two curves' right "
    "ends compare the members at equal cost; the progressive curve reaching a loss further left is "
    "the saving.")


def _figure2(source: FamilySource, figures: dict, h: str) -> list[str]:
    out = [f"{h} Figure 2: validation loss against cumulative FLOPs", ""]
    if "figure2" not in figures:
        return out + [_no_curves(source), ""]
    out += [f"![Figure 2]({figures['figure2']})", "", FIGURE2_CAPTION, ""]
    if source.built == "shrink":
        out += [SHRINK_CAPTION, ""]
    if source.missing:
        out += ["Not drawn: " + "; ".join(source.missing) + ".", ""]
    return out


SHRINK_CAPTION = (
    "This family is built downward: its largest member trains from scratch and each smaller one is "
    "pruned from a larger member, then recovered; its curves (dotted) are the largest's run and each "
    "recovery run, drawn from the FLOPs spent to have its source (the largest's training and the "
    "recoveries before it, teachers' forward passes included).")


def _pruning(source: FamilySource, h: str) -> list[str]:
    """A shrink family's pruning steps: source, rules, held-out loss before, after pruning and
    after recovery, parameters kept."""
    out = [f"{h} Pruning steps", ""]
    steps = [m for m in source.members("shrink") if m.shrink is not None]
    if not steps:
        return out + ["No pruning recorded yet: " + _build_command(source, "shrink") + ".", ""]
    rows = [["step", "width / depth", "source held-out", "pruned", "recovered", "recovery tokens",
             "non-embedding kept"]]
    for m in steps:
        p, held = m.shrink.get("params", {}), m.shrink.get("held_out", {})
        kept = p.get("pruned_nonembedding", 0) / p["source_nonembedding"] if p.get("source_nonembedding") else None
        rows.append([f"{m.shrink.get('from')} -> {m.name}", f"{m.shrink.get('width')} / {m.shrink.get('depth')}",
                     loss(held.get("source")), loss(held.get("pruned")), loss(held.get("recovered")),
                     f"{m.tokens:,.0f}", "-" if kept is None else f"{kept:.1%}"])
    return out + markdown_table(rows) + [
        "", "Held-out losses on the same validation windows (`growfam shrink`'s measure, the recovery's "
        "sequence length): the source, the member right after pruning, and after its recovery.", ""]


def _equal_flops(source: FamilySource, figures: dict, h: str) -> list[str]:
    out = [f"{h} FLOPs to equal loss", ""]
    if "equal_flops" not in figures:
        for mode in (source.built, "independent"):
            if not source.curves.get(mode):
                return out + ["Needs both modes. " + _no_curves(source, [mode]), ""]
        return out + ["No member has validation losses in both modes (does the dataset have a validation "
                      "split?).", ""]
    results = source.equal_loss()
    out += [f"![FLOPs to equal loss]({figures['equal_flops']})", "",
            f"For each member: the cumulative FLOPs at which the {source.built} curve (its stage, from its "
            "start) first reaches the independent member's final validation loss, interpolated "
            "linearly between evaluations, against the FLOPs the independent family spends up to that "
            + ("member, counted from the largest down as this family is built (so the largest, trained "
               "from scratch in both, saves nothing). " if source.built == "shrink" else "member. ")
            + "The paper reports 26% fewer at 2x Chinchilla, 31% with the max-LR adjustment. "
            "The black tick (last column) is the saving had the loss been reached only at the end of "
            "the stage (the plan's saving through that member).", ""]
    rows = [["member", "independent final val loss", "independent family FLOPs", f"{source.built} FLOPs to reach it",
             "fewer FLOPs", "at the end of the stage"]]
    for r in results:
        reached = sci(r.progressive_flops) if r.saving is not None else f"not reached (gap {r.gap:+.4f} nats)"
        rows.append([r.member, loss(r.target_loss), sci(r.independent_flops), reached,
                     f"{100 * r.saving:.1f}%" if r.saving is not None else "-", f"{100 * r.saving_at_end:.1f}%"])
    return out + markdown_table(rows) + [""]


def _tables_1_2(source: FamilySource, h: str) -> list[str]:
    out = [f"{h} Tables 1/2: members, {source.built} vs independent", ""]
    out += markdown_table(comparison_rows(source.ledger)) + [""]
    if (totals := family_flops(source.ledger)) is not None:
        out += [f"Family FLOPs (6ND): {source.built} {sci(totals[0])}, independent {sci(totals[1])}, "
                f"{_saved(totals)} saved. Δ = {source.built} − independent.", ""]
    records = [{"name": m.name, "mode": mode, "eval": m.eval.to_json()}
               for mode in (source.built, "independent") for m in source.members(mode) if m.eval is not None]
    if not records:
        return out + ["No evaluation recorded (perplexity, zero-shot tasks): "
                      + _run("eval DIR", source) + " (`--limit 50` for a quick look).", ""]
    out += markdown_table(eval_rows(records)) + [""]
    if (note := eval_note(records)) is not None:
        out += [note + ".", ""]
    lacking = [f"{mode}/{m.name}" for mode in (source.built, "independent") for m in source.members(mode)
               if m.done and m.eval is None]
    if lacking:
        out += [f"Not evaluated: {', '.join(lacking)}; " + _run("eval DIR", source) + ".", ""]
    return out


def _training(source: FamilySource, figures: dict, h: str) -> list[str]:
    out = [f"{h} Training curves", ""]
    if "training" not in figures:
        return out + [_no_curves(source), ""]
    return out + [f"![training curves]({figures['training']})", "",
                  "Per member, train loss (thin, every `log_every` steps) and validation loss (markers) "
                  "against the tokens of that member's own run: a progressive stage starts from its grown "
                  "predecessor, an independent one from scratch.", ""]


def _table_4(source: FamilySource, h: str) -> list[str]:
    out = [f"{h} Table 4: consistency between adjacent members", ""]
    section = source.ledger.consistency
    if section is None or not any(section.modes.values()):
        return out + ["No consistency measured: " + _run("consistency DIR", source) + ".", ""]
    return out + markdown_table(*consistency_rows(section.to_json())) + ["", consistency_note(section.to_json()) + ".", ""]


def _table_5(source: FamilySource, h: str) -> list[str]:
    out = [f"{h} Table 5: speculative decoding", ""]
    section = source.ledger.speculative
    if section is None:
        return out + ["No speculative decoding measured: " + _run("speculate DIR", source) + ".", ""]
    for temperature in dict.fromkeys(r["temperature"] for r in section.rows):
        out += [f"Temperature {temperature:g}:", ""] + markdown_table(*speculative_rows(section.rows, temperature)) + [""]
    out += [f"k = {section.option('k')} drafted tokens per target call; {section.option('prompts')} prompts of "
            f"{section.option('prompt_tokens')} tokens, {section.option('max_new_tokens')} new tokens each; "
            f"{section.option('device')}, {section.option('dtype')}. Acceptance = accepted / drafted tokens; "
            "speed-up = tokens/s with the draft over tokens/s of the target alone; "
            "columns: draft mode → target mode.", ""]
    return out


def _plan(source: FamilySource, h: str) -> list[str]:
    out = [f"{h} The plan", ""]
    plan = source.ledger.plan
    if not plan.get("stages"):
        return out + ["The ledger records no plan.", ""]
    totals = plan["totals"]
    rule = (f"{plan['tokens']['chinchilla']:g}x Chinchilla" if "chinchilla" in plan.get("tokens", {})
            else "explicit token budgets")
    out += [f"Family `{plan.get('name')}`, {len(plan['stages'])} stages, {plan.get('count')} parameter count, "
            f"{rule}; max LR {_lr_text(plan.get('lr', {}))}.", ""]
    out += markdown_table(*plan_rows(plan["stages"], totals)) + [""]
    out += [f"Planned saving: {totals['saving_pct']:.1f}% of FLOPs (6ND), {totals['attn_saving_pct']:.1f}% "
            "attention-inclusive (`growfam plan` adds GPU-hours).", ""]
    return out


def _growth(source: FamilySource, h: str) -> list[str]:
    if source.built == "shrink":
        return _pruning(source, h)
    out = [f"{h} Growth steps", ""]
    steps = [m for m in source.members("progressive") if m.growth is not None]
    if not steps:
        return out + ["No growth recorded (no progressive stage after the first): "
                      + _build_command(source, "progressive") + ".", ""]
    rows = [["step", "width / depth", "optimizer", "probe loss before", "after", "Δ loss", "max |Δlogits|",
             "copied", "split", "new"]]
    for m in steps:
        g = m.growth
        probe, totals = g.get("probe") or {}, g.get("totals") or {}
        rows.append([f"{g['source']['name']} -> {g['target']['name']}", f"{g.get('width')} / {g.get('depth')}",
                     str(g.get("optimizer")), loss(probe.get("loss_source")), loss(probe.get("loss_grown")),
                     f"{probe['dloss']:+.4f}" if "dloss" in probe else "-",
                     f"{probe['max_abs_dlogits']:.3g}" if "max_abs_dlogits" in probe else "-",
                     *(f"{totals[k]:,}" if k in totals else "-" for k in ("copied", "split", "new"))])
    return out + markdown_table(rows) + [
        "", "Δ loss: the grown model's loss on the probe batch (validation tokens) minus its source's, "
        "at the expansion, before any training; copied / split / new: the grown model's weights by "
        "where they came from.", ""]


def _posttrain(source: FamilySource, figures: dict, h: str) -> list[str]:
    """Appendix E: the members after SFT and DPO (`growfam posttrain`), when the family has been."""
    summary = source.ledger.extra.get("posttrain")
    if not summary:
        return []
    out = [f"{h} Post-training (Appendix E)", "", *markdown_table(posttrain_rows(summary)), ""]
    out += [f"- {line}" for line in data_lines(summary) + length_lines(summary)] + [""]
    out += [f"Held-out SFT loss: nats per assistant token; DPO accuracy: the share of held-out pairs whose "
            f"chosen reply gains more log-likelihood over the reference than the rejected one. Models and "
            f"MT-Bench answers in `{summary.get('out')}`.", ""]
    if "posttrain" in figures:
        out += [f"![post-training curves]({figures['posttrain']})", ""]
    return out


def _distillation(source: FamilySource, h: str) -> list[str]:
    """Grown members taught by their predecessors (inherit), and the distilled variants beside
    the members (retro, draft); nothing when the family has neither."""
    taught, rows = inherit_line(source.ledger), variant_rows(source.ledger)
    if taught is None and rows is None:
        return []
    out = [f"{h} Distillation", ""] + ([taught, ""] if taught else [])
    if rows is not None:
        ledger = source.ledger
        missing = [_run(f"{command} DIR", source) for command, section in
                   (("consistency", ledger.consistency), ("speculate", ledger.speculative))
                   if section is None or "variants" not in section.extra]
        out += markdown_table(rows) + ["", VARIANTS_NOTE + (f" Not measured yet: {'; '.join(missing)}." if missing
                                                            else ""), ""]
    return out


def family_sections(source: FamilySource, figures: dict, level: int) -> list[str]:
    """One family's sections at heading `level`; a section whose ledger part is malformed is
    one ConfigError naming the family's ledger."""
    h = "#" * level
    out = []
    for name, section in (("headline", lambda: [f"{h} Headline", ""] + [f"- {line}" for line in headline(source)] + [""]),
                          ("figure 2", lambda: _figure2(source, figures, h)),
                          ("FLOPs to equal loss", lambda: _equal_flops(source, figures, h)),
                          ("members", lambda: _tables_1_2(source, h)),
                          ("training curves", lambda: _training(source, figures, h)),
                          ("consistency", lambda: _table_4(source, h)),
                          ("speculative", lambda: _table_5(source, h)),
                          ("distillation", lambda: _distillation(source, h)),
                          ("posttrain", lambda: _posttrain(source, figures, h)),
                          ("plan", lambda: _plan(source, h)),
                          ("growth", lambda: _growth(source, h))):
        try:
            out += section()
        except (ConfigError, KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
            detail = str(err) if isinstance(err, ConfigError) else f"{type(err).__name__}: {err}"
            raise ConfigError(f"{FamilyDirectory(source.path).ledger}: cannot report its {name} ({detail})") from None
    return out


def render(sources: list[FamilySource], figures: list[dict], overlay: dict | None) -> str:
    """The whole REPORT.md. figures: each family's figure names; overlay: the shared figures'
    names (figure2, equal_flops) when there are several families."""
    if len(sources) == 1:
        lines = [f"{TITLE}: {sources[0].label}", "", f"Family directory: `{sources[0].path}`.", ""]
        return "\n".join(lines + family_sections(sources[0], figures[0], 2))
    lines = [f"{TITLE}: {' vs '.join(s.label for s in sources)}", "",
             "Families: " + ", ".join(f"{s.label} (`{s.path}`)" for s in sources) + ".", "",
             "## Headline figures side by side", ""] + side_by_side(sources) + [""]
    lines += ["## Figure 2, overlaid", ""]
    lines += ([f"![Figure 2, overlaid]({overlay['figure2']})", "", "A colour per family. " + FIGURE2_CAPTION, ""]
              if "figure2" in overlay else ["No family has training metrics to draw.", ""])
    lines += ["## FLOPs to equal loss, side by side", ""]
    lines += ([f"![FLOPs to equal loss]({overlay['equal_flops']})", "",
               "Per member and family, % fewer FLOPs than that family's independent family to reach the "
               "independent member's final validation loss (each family's own section has the numbers).", ""]
              if "equal_flops" in overlay else ["No family has both modes to compare.", ""])
    for source, names in zip(sources, figures):
        lines += [f"## {source.label}", ""] + family_sections(source, names, 3)
    return "\n".join(lines)
