"""The one set of number formatters for every table and log line growfam prints.

Each takes a number or None (shown as "-", a value not measured yet).
"""

from __future__ import annotations


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
