"""The report's figures as PNG files, drawn with matplotlib's Agg canvas (no display, no pyplot,
no global backend switch: importing this module changes nothing for a user's own plots).

- `figure2`: validation loss against cumulative training FLOPs (log x), the paper's Figure 2:
  progressive stages from their cumulative-FLOPs offset, starting at their growth point (◇);
  independent members from 0. One family: a colour per member; several: a colour per family.
- `training_curves`: per member, train and validation loss against the tokens of its own run.
- `equal_flops_chart`: per member, the FLOPs saved to reach the independent member's final
  validation loss, and the saving had it been reached only at the end of the stage.
"""

from __future__ import annotations

import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from growfam.report.curves import MemberCurve
from growfam.report.equal_flops import EqualLoss
from growfam.text import si

DPI = 110
_STYLE = {"progressive": dict(linestyle="-", marker="o"), "independent": dict(linestyle="--", marker="s"),
          "shrink": dict(linestyle=":", marker="^")}
_FLOPS_LABEL = "cumulative training FLOPs (6ND)"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)
    return path


def _colours(n: int) -> list:
    """n distinct colours (tab10, then again)."""
    return [f"C{k % 10}" for k in range(n)]


def _si_axis(axis) -> None:
    axis.set_major_formatter(FuncFormatter(lambda x, _: si(x)))


def _draw_mode(ax, curves: list[MemberCurve], mode: str, colours: dict) -> None:
    """One mode's validation curves on the FLOPs axis; a progressive stage's growth point is a
    black diamond joined by a thin line to where the previous stage ended."""
    previous = None
    for curve in curves:
        points = curve.val_by_flops()
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, color=colours[curve.name], markersize=3.5, linewidth=1.4, **_STYLE[mode])
        if curve.start is not None:
            if previous is not None and previous.val:  # from the state it grew from (not an average)
                tokens, last = previous.val[-1]
                ax.plot([previous.flops(tokens), curve.start[0]], [last, curve.start[1]], color="0.3", linewidth=0.8)
            ax.plot(*curve.start, marker="D", markerfacecolor="none", markeredgecolor="black", markersize=7,
                    zorder=5)
        previous = curve


def _mode_handles(curves_by_mode: dict) -> list:
    handles = [Line2D([], [], color="0.2", label=mode, **_STYLE[mode]) for mode in _STYLE if curves_by_mode.get(mode)]
    if any(c.start for c in curves_by_mode.get("progressive", [])):
        handles.append(Line2D([], [], marker="D", markerfacecolor="none", markeredgecolor="black", linestyle="",
                              label="growth point"))
    return handles


def figure2(families: list[tuple[str, dict[str, list[MemberCurve]]]], path: Path) -> Path:
    """families: [(label, {mode: curves})]; one family gets a colour per member, several a
    colour per family."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    single = len(families) == 1
    family_colours = _colours(len(families))
    handles = []
    for k, (label, by_mode) in enumerate(families):
        names = list(dict.fromkeys(c.name for mode in _STYLE for c in by_mode.get(mode, [])))
        colours = dict(zip(names, _colours(len(names)))) if single else {n: family_colours[k] for n in names}
        for mode in _STYLE:
            _draw_mode(ax, by_mode.get(mode, []), mode, colours)
        handles += ([Line2D([], [], color=colours[n], label=n) for n in names] if single
                    else [Line2D([], [], color=family_colours[k], linewidth=3, label=label)])
    handles += _mode_handles({mode: [c for _, by_mode in families for c in by_mode.get(mode, [])] for mode in _STYLE})
    ax.set_xscale("log")
    ax.set_xlabel(_FLOPS_LABEL)
    ax.set_ylabel("validation loss (nats)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    ax.set_title("validation loss vs cumulative FLOPs" + (f": {families[0][0]}" if single else ""))
    return _save(fig, path)


def training_curves(label: str, by_mode: dict[str, list[MemberCurve]], path: Path) -> Path:
    """A panel per member: train loss (thin) and validation loss (markers) against the tokens
    of its own run, a colour per mode."""
    names = list(dict.fromkeys(c.name for mode in _STYLE for c in by_mode.get(mode, [])))
    cols = min(2, len(names)) or 1
    rows = max(1, math.ceil(len(names) / cols))
    fig = Figure(figsize=(5 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    mode_colour = {"progressive": "tab:blue", "independent": "tab:orange", "shrink": "tab:green"}
    for ax, name in zip(axes, names):
        for mode, colour in mode_colour.items():
            curve = next((c for c in by_mode.get(mode, []) if c.name == name), None)
            if curve is None:
                continue
            if curve.train:
                ax.plot(*zip(*curve.train), color=colour, linewidth=0.9, alpha=0.7, label=f"{mode} train")
            if curve.val:
                ax.plot(*zip(*curve.val), color=colour, markersize=4, linewidth=1.6,
                        label=f"{mode} val", **_STYLE[mode])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("tokens (this run)")
        _si_axis(ax.xaxis)
        ax.set_ylabel("loss (nats)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"training curves: {label}")
    return _save(fig, path)


def equal_flops_chart(families: list[tuple[str, list[EqualLoss]]], path: Path) -> Path:
    """families: [(label, results)]. A bar per member (grouped by family when several): % fewer FLOPs than the independent
    family to reach the independent member's final validation loss; "not reached" with the
    gap in nats where the progressive stage never got there; a black tick at the end-of-stage
    saving."""
    names = list(dict.fromkeys(r.member for _, results in families for r in results))
    fig = Figure(figsize=(min(12.0, max(5.0, 1.2 * len(names) * len(families) + 2)), 4.2), layout="constrained")
    ax = fig.add_subplot()
    width = 0.8 / len(families)
    colours = _colours(len(families))
    for k, (label, results) in enumerate(families):
        labelled = False
        for r in results:
            x = names.index(r.member) + (k - (len(families) - 1) / 2) * width
            if r.saving is None:
                ax.text(x, 100 * r.saving_at_end + 2, f"not reached\n({r.gap:+.3f} nats)", ha="center",
                        va="bottom", fontsize=7, rotation=90 if len(families) > 1 else 0)
            else:
                ax.bar(x, 100 * r.saving, width * 0.9, color=colours[k], label=None if labelled else label)
                labelled = True
                ax.text(x, 100 * r.saving + 1, f"{100 * r.saving:.0f}%", ha="center", va="bottom", fontsize=8)
            ax.plot([x - width * 0.45, x + width * 0.45], [100 * r.saving_at_end] * 2, color="black", linewidth=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("% fewer FLOPs than the independent family")
    ax.set_ylim(min([0.0] + [100 * r.saving for _, results in families for r in results if r.saving is not None]),
                105)
    ax.grid(True, axis="y", alpha=0.3)
    handles = ax.get_legend_handles_labels()[0] if len(families) > 1 else []
    handles.append(Line2D([], [], color="black", linewidth=2, label="the saving had it got there only at the stage's end"))
    ax.legend(handles=handles, fontsize=8, loc="upper left")
    ax.set_title("FLOPs to reach the independent member's final val loss")
    return _save(fig, path)


def posttrain_curves(summary: dict, path: Path) -> Path:
    """SFT and DPO training loss against optimizer step, a line per member and mode, from a
    posttrain summary (growfam.posttrain.run)."""
    fig = Figure(figsize=(11, 4))
    for ax, phase in zip(fig.subplots(1, 2), ("sft", "dpo")):
        members = summary.get("members", {})
        for colour, (key, result) in zip(_colours(len(members)), members.items()):
            curve = (result.get(phase) or {}).get("curve") or []
            if curve:
                ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], label=key, color=colour,
                        **_STYLE.get(key.partition("/")[0], {}))
        ax.set_title(f"{phase.upper()} training loss")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)

