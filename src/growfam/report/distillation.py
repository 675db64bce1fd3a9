"""The report's Distillation section: grown members that learned from their predecessors
(`distill: {inherit}`) and the distilled variants beside the members (`distill: {retro, draft}`)
against the members they came from, with what `growfam consistency` and `growfam speculate`
measured of them."""

from __future__ import annotations

from growfam.family.ledger import Ledger, MemberEntry
from growfam.text import loss, sci, si

VARIANTS_NOTE = ("Each variant: its member's published weights trained against the teacher (`distill.retro`: the "
                 "largest member; `distill.draft`: the next larger one); before: the member. KL: KL(teacher ‖ "
                 "student) and acceptance: Σ min(p, q), the expected speculative acceptance, on the consistency "
                 "windows; α: the share of drafted tokens the teacher accepted in speculative decoding, per "
                 "temperature (drafts only).")


def inherit_line(ledger: Ledger) -> str | None:
    """One sentence on the progressive members that learned from the member they grew from, with
    their teachers' FLOPs; None when none did."""
    taught = [m for m in ledger.members("progressive") if m.distill]
    if not taught:
        return None
    inherit = (ledger.distill or {}).get("inherit", {})
    return (f"Grown members learned from the member they grew from (`distill.inherit`: {inherit}); their teachers' "
            "forward passes, " + ", ".join(f"{m.name} {sci(m.distill['flops'])}" for m in taught)
            + " FLOPs, are in the cumulative FLOPs above.")


def variant_rows(ledger: Ledger) -> list[list[str]] | None:
    """A header and a row per variant (mode, name, teacher, tokens, FLOPs, validation loss, KL and
    acceptance to the teacher before and after, α); None without variants."""
    variants = [(mode, v) for mode, entries in (ledger.variants or {}).items() for v in entries]
    if not variants:
        return None
    measured = ledger.consistency.extra.get("variants", {}) if ledger.consistency else {}
    decoded = ledger.speculative.extra.get("variants", []) if ledger.speculative else []
    rows = [["mode", "variant", "teacher", "tokens", "FLOPs student + teacher", "val loss before", "after",
             "KL before", "after", "acceptance before", "after", "α before → after"]]
    for mode, v in variants:
        m = next((r for r in measured.get(mode, []) if r.get("variant") == v.name), None)
        rows.append([mode, v.name, str(v.extra.get("teacher_member")), si(v.tokens),
                     f"{sci(v.flops)} + {sci(v.distill['flops'])}", loss(v.extra.get("before", {}).get("val_loss")),
                     loss(v.val_loss),
                     *((f"{m['before']['kl_large_small']:.4f}", f"{m['after']['kl_large_small']:.4f}",
                        f"{m['before']['acceptance']:.4f}", f"{m['after']['acceptance']:.4f}") if m else ("-",) * 4),
                     _alphas(decoded, mode, v)])
    return rows


def _alphas(rows: list[dict], mode: str, variant: MemberEntry) -> str:
    """A draft variant's measured acceptance α against its teacher, before (its member) and
    after, per temperature: "T=0: 0.710 → 0.730"; "-" when not measured."""
    def alpha(draft: str, temperature) -> str:
        row = next((r for r in rows if (r["draft_mode"], r["draft"], r["target"], r["temperature"])
                    == (mode, draft, variant.extra.get("teacher_member"), temperature)), None)
        return "-" if row is None else f"{row['alpha']:.3f}"

    temperatures = sorted({r["temperature"] for r in rows if r["draft"] == variant.name and r["draft_mode"] == mode})
    return "; ".join(f"T={t:g}: {alpha(variant.extra.get('of'), t)} → {alpha(variant.name, t)}"
                     for t in temperatures) or "-"
