"""The post-training table (the paper's Appendix E: progressive against independent at each
size after SFT and DPO) and the SFT/DPO training curves, from a posttrain summary
(OUT/posttrain.json, or family.json's `posttrain`)."""

from __future__ import annotations

from growfam.text import loss, text_table

HEADER = ["member", "mode", "MT-Bench", "judged", "SFT held-out before", "after", "DPO acc", "DPO margin", "wall s"]


def _split(key: str) -> tuple[str, str]:
    mode, _, name = key.rpartition("/")
    return name, mode or "-"


def posttrain_rows(summary: dict) -> list[list[str]]:
    """A header, then a row per member and mode, members of one size together: MT-Bench score
    (with judged/missing turns), SFT held-out loss (nats per assistant token) before and after,
    DPO held-out reward accuracy and margin, wall seconds of SFT + DPO."""
    members = summary.get("members", {})
    order = list(dict.fromkeys(_split(k)[0] for k in members))
    rows = [HEADER]
    for name in order:
        for key in (k for k in members if _split(k)[0] == name):
            r = members[key]
            sft, dpo, bench = r.get("sft") or {}, r.get("dpo") or {}, r.get("mt_bench") or {}
            score = bench.get("score")
            judged = f"{bench['judged']}/{bench['judged'] + bench['missing']}" if "judged" in bench else "-"
            rows.append([name, _split(key)[1], "-" if score is None else f"{score:.2f}", judged,
                         loss(sft.get("held_out_loss_before")), loss(sft.get("held_out_loss")),
                         "-" if dpo.get("reward_accuracy") is None else f"{dpo['reward_accuracy']:.3f}",
                         "-" if dpo.get("reward_margin") is None else f"{dpo['reward_margin']:+.2e}",
                         f"{sft.get('wall_s', 0) + dpo.get('wall_s', 0):.1f}"])
    return rows


def data_lines(summary: dict) -> list[str]:
    """One line per phase: the source, how much trained and was held out, what was dropped."""
    lines = []
    for phase, d in summary.get("data", {}).items():
        dropped = ", ".join(f"{n} {why}" for why, n in d.get("dropped", {}).items()) or "none"
        note = " (synthetic pairs: rejected = another conversation's reply)" if d.get("synthetic") else ""
        lines.append(f"{phase.upper()} data {d['source']}: {d['train']} train, {d['held_out']} held out, "
                     f"dropped: {dropped}{note}")
    if any(d.get("source") == "sharegpt" for d in summary.get("data", {}).values()):
        lines.append("ShareGPT is ChatGPT output without a licence: for trials and tests, never for a release.")
    return lines


def length_lines(summary: dict) -> list[str]:
    """Per member, the sequences --max-length truncated and those it left without a reply
    token (which TRL drops), where there were any."""
    members = summary.get("members", {})
    by_text: dict[str, list[str]] = {}
    for key, r in members.items():
        parts = []
        for phase in ("sft", "dpo"):
            p = r.get(phase) or {}
            total = p.get("examples", p.get("pairs"))
            dropped = sum(v for k, v in p.items() if k.startswith("dropped"))
            if p.get("truncated"):
                parts.append(f"{phase.upper()} {p['truncated']} of {total} truncated at {p['max_length']} tokens, "
                             f"{dropped} of them with no reply token left (dropped)")
        if parts:
            by_text.setdefault("; ".join(parts), []).append(key)
    return [f"{'every member' if len(keys) == len(members) > 1 else ', '.join(keys)}: {text}"
            for text, keys in by_text.items()]


def format_posttrain(summary: dict) -> str:
    """The table, the data lines and the length lines as text."""
    return "\n".join([*text_table(posttrain_rows(summary)), "", *data_lines(summary), *length_lines(summary)])
