"""Text for people: the one set of number formatters for every table and log line growfam
prints, and the text table they go in. Imports nothing of growfam: every stage may use it.

Each formatter takes a number or None (shown as "-", a value not measured yet).
"""

from __future__ import annotations

from collections.abc import Sequence


def si(x: float | None) -> str:
    """1.09e9 -> '1.09B': counts with a K/M/B/T suffix and three significant digits."""
    if x is None:
        return "-"
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    """2.4e20 -> '2.40e20': three significant digits, no '+' or leading zeros in the exponent."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def short(x: float | None) -> str:
    """Three significant digits as Python writes them (FLOPs in the family table: '3.9e+11')."""
    return "-" if x is None else f"{x:.3g}"


def loss(x: float | None) -> str:
    """A loss in nats, four decimals."""
    return "-" if x is None else f"{x:.4f}"


def hours(h: float) -> str:
    """GPU-hours: whole hours with thousands separators from 100 up, three digits below."""
    return f"{h:,.0f}" if h >= 100 else f"{h:.3g}"


def text_table(rows: list[list[str]], groups: Sequence[tuple[int, int, str]] = ()) -> list[str]:
    """Rows as text columns, right-aligned to the widest cell except the first (names).

    groups: (first column, last column, label) spans labelled on a line above the rows.
    """
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for first, last, label in groups:  # widen a group's last column until its label fits
        widths[last] += max(0, len(label) + 2 - (sum(widths[first:last + 1]) + 2 * (last - first)))
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    if groups:
        starts = [sum(widths[:c]) + 2 * c for c in range(len(widths))]
        above = [" "] * len(lines[0])
        for first, last, label in groups:
            span = starts[last] + widths[last] - starts[first]
            text = f" {label} ".center(span, "-")
            above[starts[first]:starts[first] + span] = text
        lines.insert(0, "".join(above).rstrip())
    return lines
