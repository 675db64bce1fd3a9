"""The tables `growfam eval` and `growfam consistency` print: member × metric with Progressive
(or Shrink, in a family built downward) and Independent side by side and their difference (the
paper's Tables 1-2), and the pairs' KL with the Progressive / Independent ratio (Table 4)."""

from __future__ import annotations

from growfam.text import loss, text_table

#: (row label, source, key, kind) of the perplexity rows; kind "ppl" shows three significant
#: digits, "frac" (bits per byte, accuracies) four decimals. Rows no member has are left out.
_PPL_ROWS = (("val ppl", "val", "perplexity", "ppl"), ("val bits/byte", "val", "bits_per_byte", "frac"),
             ("wiki word ppl", "wiki", "word_ppl", "ppl"), ("wiki bits/byte", "wiki", "bpb", "frac"))
_TASK_LABELS = {"lambada_openai": "lambada", "arc_easy": "arc-e", "arc_challenge": "arc-c",
                "winogrande": "winogrande", "piqa": "piqa", "openbookqa": "openbookqa", "hellaswag": "hellaswag"}
_MODE_LABELS = {"progressive": "prog", "independent": "ind", "shrink": "shrink", None: "value"}


def _built(modes) -> str:
    """The mode compared with independent: shrink in a family built downward, else progressive."""
    return "shrink" if "shrink" in modes else "progressive"


def _rows_of(records: list[dict]) -> list[tuple[str, str, str, str, str]]:
    """(label, section, name, key, kind) for every metric some member has."""
    have = {(sec, name, key) for r in records for sec in ("perplexity", "tasks")
            for name, metrics in r.get(sec, {}).items() for key in metrics}
    rows = [(label, "perplexity", name, key, kind) for label, name, key, kind in _PPL_ROWS]
    files = sorted({name for r in records for name in r.get("perplexity", {}) if name.startswith("file:")})
    for name in files:
        short_name = name.rsplit("/", 1)[-1]
        rows += [(f"{short_name} ppl", "perplexity", name, "perplexity", "ppl"),
                 (f"{short_name} bits/byte", "perplexity", name, "bits_per_byte", "frac")]
    for task in (t for t in _TASK_LABELS if any(t in r.get("tasks", {}) for r in records)):
        rows += [(f"{_TASK_LABELS[task]} {key}", "tasks", task, key, "frac") for key in ("acc", "acc_norm")]
    return [row for row in rows if (row[1], row[2], row[3]) in have]


def _value(record: dict | None, section: str, name: str, key: str):
    value = (record or {}).get(section, {}).get(name, {}).get(key)
    return value if isinstance(value, (int, float)) else None


def _cell(value, kind: str, sign: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:{sign}.3g}" if kind == "ppl" else (loss(value) if not sign else f"{value:+.4f}")


def eval_rows(members: list[dict]) -> list[list[str]]:
    """The rows of `format_eval`: a header, then per member a row with its name alone followed
    by its metric rows (labels indented by two spaces)."""
    modes = [m for m in ("progressive", "shrink", "independent") if any(r["mode"] == m for r in members)] or [None]
    by_key = {(r["mode"], r["name"]): r["eval"] for r in members}
    rows = _rows_of([r["eval"] for r in members])
    both = len(modes) == 2
    table = [["metric"] + [_MODE_LABELS[m] for m in modes] + (["Δ"] if both else [])]
    for name in dict.fromkeys(r["name"] for r in members):
        table.append([name] + [""] * (len(table[0]) - 1))
        for label, section, source, key, kind in rows:
            values = [_value(by_key.get((mode, name)), section, source, key) for mode in modes]
            line = [f"  {label}"] + [_cell(v, kind) for v in values]
            if both:
                line.append("-" if None in values else _cell(values[0] - values[1], kind, "+"))
            table.append(line)
    return table


def eval_note(members: list[dict]) -> str | None:
    """The line under `format_eval`'s table saying how many examples the tasks scored, or None."""
    limits = sorted({t.get("limit") for r in members for t in [*r["eval"].get("tasks", {}).values(),
                                                                 r["eval"].get("perplexity", {}).get("wiki", {})]}
                    - {None})
    if not limits:
        return None
    return (f"lm_eval tasks and wiki: the first {', '.join(map(str, limits))} examples of each "
            "(--limit); acc is the share answered right")


def format_eval(members: list[dict]) -> str:
    """members: [{name, mode, eval}] (what `evaluate_target` returns). Per member a block of
    metric rows; a column per mode, and Δ = progressive (or shrink) − independent when there are both."""
    lines, note = text_table(eval_rows(members)), eval_note(members)
    return "\n".join(lines + (["", note] if note else []))


def consistency_rows(section: dict) -> tuple[list[list[str]], list[tuple[int, int, str]]]:
    """The rows and column groups of `format_consistency` (for `text_table`)."""
    modes = section.get("modes", {})
    built = _built(modes)
    prog, ind = modes.get(built, []), modes.get("independent", [])
    pairs = list(dict.fromkeys((r["small"], r["large"]) for r in prog + ind))

    def find(rows, pair):
        return next((r for r in rows if (r["small"], r["large"]) == pair), None)

    metrics = (("KL(small‖large)", "kl_small_large"), ("KL(large‖small)", "kl_large_small"),
               ("acceptance", "acceptance"))
    header, groups = ["pair"], []
    for label, _ in metrics:
        groups.append((len(header), len(header) + 2, label))
        header += [_MODE_LABELS[built], "ind", "ratio"]
    table = [header]
    for pair in pairs:
        p, i = find(prog, pair), find(ind, pair)
        line = [f"{pair[0]} -> {pair[1]}"]
        for _, key in metrics:
            vp, vi = (p or {}).get(key), (i or {}).get(key)
            ratio = f"{vp / vi:.2f}" if vp is not None and vi else "-"
            line += [loss(vp), loss(vi), ratio]
        table.append(line)
    return table, groups


def consistency_note(section: dict) -> str:
    """The line under `format_consistency`'s table: windows, ratio, acceptance."""
    return (f"{section.get('windows')} validation windows of {section.get('window')} tokens per pair "
            f"(the same for every pair); ratio = {_built(section.get('modes', {}))} / independent; "
            "acceptance = Σ min(p, q) = 1 − TV")


def format_consistency(section: dict) -> str:
    """The `consistency` section: per pair, KL(small‖large), KL(large‖small) and the expected
    speculative acceptance Σ min(p, q), Progressive vs Independent with their ratio."""
    return "\n".join(text_table(*consistency_rows(section)) + ["", consistency_note(section)])
