"""Every text table a command prints about a plan or a built family: the plan (`format_plan`),
its memory per GPU (`format_memory`) and the built family (`format_comparison`), aligned by
growfam.text's `text_table`."""

from __future__ import annotations

import math

from typing import Sequence

from growfam.config import CHINCHILLA_TOKENS_PER_PARAM, FamilyConfig
from growfam.family.directory import mode_pairs
from growfam.family.ledger import Ledger
from growfam.family.plan import FamilyPlan, GpuHours
from growfam.model import num_params
from growfam.family.memory import fsdp_memory
from growfam.text import hours, loss, sci, short, si, text_table

# --------------------------------------------------------------------------------------------
# The plan's table
# --------------------------------------------------------------------------------------------


def plan_rows(stages: Sequence[dict], totals: dict, gpu: GpuHours | None = None) -> tuple[list[list[str]], list]:
    """The plan's table as (rows, groups) for `text_table` or a Markdown renderer: a header, a
    row per stage and the totals. stages / totals: `FamilyPlan.to_dict()`'s (or a ledger's
    `plan`); gpu: the GPU-hours columns, left out when None."""
    header = ["stage", "params", "batch", "seq", "ind", "prog", "ind", "prog", "ind", "prog",
              "ind", "prog", "max LR"] + (["ind", "prog"] if gpu else [])
    groups = [(4, 5, "tokens"), (6, 7, "steps"), (8, 9, "FLOPs 6ND"), (10, 11, "cumulative")] + \
        ([(13, 14, "GPU-hours")] if gpu else [])
    body = [
        [s["name"], si(s["params"]), str(s["batch_size"]), str(s["seq_len"]),
         si(s["tokens_independent"]), si(s["tokens_progressive"]),
         str(s["steps_independent"]), str(s["steps_progressive"]),
         sci(s["flops_independent"]), sci(s["flops_progressive"]),
         sci(s["cum_flops_independent"]), sci(s["cum_flops_progressive"]), f"{s['max_lr']:.3g}"]
        + ([hours(gpu.independent[i]), hours(gpu.progressive[i])] if gpu else [])
        for i, s in enumerate(stages)
    ]
    total = ["total", "", "", "", si(totals["tokens_independent"]), si(totals["tokens_progressive"]),
             str(totals["steps_independent"]), str(totals["steps_progressive"]),
             sci(totals["flops_independent"]), sci(totals["flops_progressive"]), "", "", ""] \
        + ([hours(gpu.total_independent), hours(gpu.total_progressive)] if gpu else [])
    return [header] + body + [total], groups


def format_plan(plan: FamilyPlan, peak_tflops: float, mfu: float) -> str:
    """The plan as an aligned text table (ind = Independent, prog = Progressive)."""
    family, gpu, data = plan.family, plan.gpu_hours(peak_tflops, mfu), plan.to_dict()
    rule = (f"{family.chinchilla:g}x Chinchilla (D = {family.chinchilla * CHINCHILLA_TOKENS_PER_PARAM:g}·N)"
            if family.chinchilla is not None else "explicit tokens")
    lines = [f"family {family.name}: {len(plan.stages)} stages, {family.count} parameter count, {rule}", ""]
    lines += text_table(*plan_rows(data["stages"], data["totals"], gpu))
    lines += [
        "",
        f"saving: {100 * plan.saving:.1f}% of FLOPs (6ND), {100 * plan.attn_saving:.1f}% attention-inclusive",
        f"GPU-hours (attention-inclusive FLOPs at {peak_tflops:g} TFLOP/s peak, {100 * mfu:g}% MFU): "
        f"{hours(gpu.total_independent)} independent, {hours(gpu.total_progressive)} progressive, "
        f"{hours(gpu.total_independent - gpu.total_progressive)} saved",
    ]
    teacher = data["totals"].get("teacher_flops_progressive")
    if teacher:
        lines.append(f"distill.inherit: the teachers' forward passes cost {sci(teacher)} FLOPs, in the progressive "
                     "cumulative column and the saving")
    if plan.variants:
        lines.append("distilled variants, in each mode (tokens; FLOPs: the student's 6ND + the teacher's forwards):")
        lines += [f"  {v.name} from {v.teacher}: {si(v.tokens)} tokens, {sci(v.flops)} + {sci(v.teacher_flops)}"
                  for v in plan.variants]
    if plan.flops_shrink is not None:
        lines += ["", *_shrink_lines(plan)]
    if family.growth.source == "stable" and family.direction == "grow":
        branches = [f"{st.name} {si(math.ceil(family.lr.decay * st.steps_progressive) * st.tokens_per_step)}"
                    for st in plan.stages[:-1]]
        lines.append(f"growth from the stable phase: each member but the largest is published from its stage's "
                     f"decay ({family.lr.decay:g} of its steps, inside its budget) and the next grows from the "
                     f"checkpoint before it; decay-branch tokens: {', '.join(branches)}")
    if plan.given is not None:
        g = plan.given
        lines.append(f"given: {g.name} is start_from {family.start_from}; its {si(g.given_tokens)} tokens "
                     f"({sci(g.given_flops)} FLOPs) from scratch are not spent by the family (columns "
                     "tokens, steps, FLOPs), but counted in the cumulative ones (Eq. 4)")
    return "\n".join(lines)


def _shrink_lines(plan: FamilyPlan) -> list[str]:
    """A shrink family's budgets: the largest trained, the others pruned and recovered."""
    section, stages = plan.family.shrink, plan.stages
    source = "the member above it" if section.source == "previous" else f"{stages[-1].name}"
    how = "distillation from it" if section.recover == "kd" else "cross-entropy"
    rows = [["stage", "tokens", "steps", "FLOPs 6ND", "teacher", "cumulative", "from"]]
    for i, st in enumerate(stages):
        rows.append([st.name, si(st.tokens_shrink), str(st.steps_shrink), sci(st.flops_shrink),
                     sci(st.teacher_flops_shrink), sci(st.cum_flops_shrink),
                     "trained" if i == len(stages) - 1 else stages[section.teacher(i, len(stages))].name])
    rows.append(["total", si(sum(st.tokens_shrink for st in stages)), str(sum(st.steps_shrink for st in stages)),
                 sci(sum(st.flops_shrink for st in stages)), sci(sum(st.teacher_flops_shrink for st in stages)),
                 sci(plan.flops_shrink), ""])
    return [f"direction shrink: {stages[-1].name} trains on its D(N); each smaller member is pruned from {source} "
            f"({section.width} scores, {section.depth} depth) and recovered by {how} on "
            f"{section.tokens:g} x its D(N):", *text_table(rows),
            f"shrink family: {sci(plan.flops_shrink)} FLOPs in all, "
            f"{100 * (1 - plan.flops_shrink / plan.flops_independent):.1f}% less than independent, "
            f"{plan.flops_shrink / (plan.flops_progressive + plan.teacher_flops):.2f}x progressive"]


def format_memory(family: FamilyConfig, gpus: int, micro_batch: int, checkpoint_every: int,
                  loss_chunk: int = 0) -> str:
    """Each member's estimated memory per GPU under FSDP2 (family/memory.py), in GiB; every
    `checkpoint_every`-th block checkpointed (0: none), the loss in chunks of `loss_chunk`
    tokens (0: whole)."""
    header = ["member", "params", "params", "grads", "AdamW", "gathered", "activations", "total"]
    body = []
    for cfg, seq_len in zip(family.members, family.seq_lens):
        m = fsdp_memory(cfg, gpus, micro_batch, seq_len, checkpoint_every, loss_chunk)
        body.append([cfg.name, si(num_params(cfg))] +
                    [f"{b / 2**30:.1f}" for b in (m.parameters, m.gradients, m.moments, m.gathered, m.activations,
                                                 m.total)])
    checkpointing = {0: "without activation checkpointing", 1: "every block's activations checkpointed"}.get(
        checkpoint_every, f"one block's activations in {checkpoint_every} checkpointed")
    lines = [f"memory per GPU (GiB), FSDP2 over {gpus} GPU(s), bf16 mixed precision, micro-batch {micro_batch} "
             f"sequences, {checkpointing}" + (f", the loss in chunks of {loss_chunk} tokens" if loss_chunk else ""),
             ""]
    lines += text_table([header] + body, [(2, 7, "per GPU")])
    lines += ["", "an estimate: add ~0.5 GiB of CUDA context and the allocator's slack; bench/parallel.py --gpu "
                  "measures the real peak"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The built family's table (from its ledger)
# --------------------------------------------------------------------------------------------


def comparison_rows(ledger: Ledger) -> list[list[str]]:
    """Per member (a header, then a row each): parameters, tokens, validation loss and FLOPs,
    the family's built mode (Progressive, or Shrink) vs Independent, and Δ val = built −
    independent. A shrink member's FLOPs count its recovery's teacher and its source's chain."""
    built = ledger.built_mode
    prog, ind = ledger.members(built), ledger.members("independent")
    short_name = _SHORT_MODE[built]
    names = [m.name for m in (prog if len(prog) >= len(ind) else ind)]
    rows = [["member", "params", f"tokens {short_name}", "tokens ind", f"val {short_name}", "val ind", "Δ val",
             f"FLOPs {short_name} (cum)", "FLOPs ind"]]

    def get(members, name, key):
        entry = next((m for m in members if m.name == name), None)
        return getattr(entry, key) if entry is not None else None

    for name in names:
        vp, vi = get(prog, name, "val_loss"), get(ind, name, "val_loss")
        params = get(prog, name, "params") or get(ind, name, "params")
        rows.append([
            name, si(params), si(get(prog, name, "tokens")), si(get(ind, name, "tokens")),
            loss(vp), loss(vi), f"{vp - vi:+.4f}" if vp is not None and vi is not None else "-",
            short(get(prog, name, "cum_flops")), short(get(ind, name, "spent_flops")),
        ])
    return rows


def built_flops(ledger: Ledger) -> float | None:
    """FLOPs (6ND) of the family's built mode once every planned member is done: the largest
    progressive member's cumulative FLOPs, or a shrink family's training and recoveries with
    their teachers; else None."""
    members, planned = ledger.members(ledger.built_mode), len(ledger.stage_names)
    if not members or len(members) < planned or not all(m.done for m in members):
        return None
    return members[-1].cum_flops if ledger.built_mode == "progressive" else sum(m.spent_flops for m in members)


def family_flops(ledger: Ledger) -> tuple[float, float] | None:
    """(built, independent) FLOPs of the whole family (built_flops; independent: every member
    from scratch), when both modes have every member and the independent total is positive;
    else None."""
    built, ind = built_flops(ledger), ledger.members("independent")
    total_i = sum(m.spent_flops for m in ind)
    if built is not None and len(ind) == len(ledger.members(ledger.built_mode)) and total_i > 0:
        return built, total_i
    return None


def format_comparison(ledger: Ledger) -> str:
    """Per member: validation loss and FLOPs, the built mode vs Independent, and the family saving."""
    lines = text_table(comparison_rows(ledger))
    totals = family_flops(ledger)
    if totals is not None:
        total_p, total_i = totals
        built = ledger.built_mode
        wall = [sum(m.wall_s for m in ledger.members(mode)) for mode in (built, "independent")]
        lines.append("")
        lines.append(f"family FLOPs (6ND): {built} {total_p:.3g}, independent {total_i:.3g} — "
                     f"{1 - total_p / total_i:.1%} saved; wall time {wall[0]:.0f} s vs {wall[1]:.0f} s")
    return "\n".join(lines)

# --------------------------------------------------------------------------------------------
# Speculative decoding (paper Table 5), from the ledger's `speculative` section
# --------------------------------------------------------------------------------------------

_SHORT_MODE = {"progressive": "prog", "independent": "ind", "shrink": "shrink"}


def speculative_rows(rows: list[dict], temperature: float) -> tuple[list[list[str]], list]:
    """Table 5 at one temperature as (rows, groups): a row per (draft -> target) pair, and per
    (draft mode, target mode) combination the acceptance (accepted / drafted) and the speed-up
    (tokens/s against the target decoding alone). rows: the section's `rows`."""
    here = [r for r in rows if r["temperature"] == temperature]
    pairs = list(dict.fromkeys((r["draft"], r["target"]) for r in here))
    shrunk = any("shrink" in (r["draft_mode"], r["target_mode"]) for r in rows)
    combos = mode_pairs("shrink" if shrunk else "progressive")
    header, groups = ["draft -> target"], []
    for draft_mode, target_mode in combos:
        groups.append((len(header), len(header) + 1, f"{_SHORT_MODE[draft_mode]}→{_SHORT_MODE[target_mode]}"))
        header += ["accept", "speed-up"]
    table = [header]
    for draft, target in pairs:
        line = [f"{draft} -> {target}"]
        for draft_mode, target_mode in combos:
            row = next((r for r in here if (r["draft"], r["target"], r["draft_mode"], r["target_mode"])
                        == (draft, target, draft_mode, target_mode)), None)
            line += ["-", "-"] if row is None else [f"{row['acceptance']:.3f}", f"{row['speedup']:.2f}×"]
        table.append(line)
    return table, groups
