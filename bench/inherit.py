"""Knowledge inheritance against none: two built families that differ only in `distill:
{inherit: ...}` (tiny and tiny-inherit), compared member by member from their ledgers and
training curves.

For each progressive member: the final validation loss without and with inheritance, the
cumulative FLOPs of each (the teachers' forward passes included), and the cumulative FLOPs at
which the inheriting member's validation curve first reaches the plain member's final loss
(linearly interpolated between evaluations; "not reached" with the gap left otherwise); the
independent member's final loss beside them when the first family has one. Nothing is trained.

    growfam family run tiny --out family/tiny
    growfam family run tiny-inherit --mode progressive --data family/tiny/data --out family/tiny-inherit
    python bench/inherit.py family/tiny family/tiny-inherit
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from growfam.family.ledger import read_ledger
from growfam.report.curves import member_curves
from growfam.report.equal_flops import flops_to_equal_loss
from _script import run
from growfam.text import loss, sci, text_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plain", type=Path, help="the family built without inheritance")
    parser.add_argument("inherit", type=Path, help="the same family built with distill: {inherit: ...}")
    args = parser.parse_args()
    ledgers = [read_ledger(path) for path in (args.plain, args.inherit)]
    for path, ledger in zip((args.plain, args.inherit), ledgers):
        if ledger is None or not ledger.members("progressive"):
            print(f"{path}: not a family directory with progressive members", file=sys.stderr)
            return 2
    plain, inherit = ledgers
    if inherit.distill is None:
        print(f"{args.inherit}: its family has no distill: section", file=sys.stderr)
        return 2
    (plain_curves, _), (inherit_curves, _) = (member_curves(path, ledger, "progressive")
                                              for path, ledger in zip((args.plain, args.inherit), ledgers))
    reached = {r.member: r for r in flops_to_equal_loss(inherit_curves, plain_curves)}
    independent = {m.name: m for m in plain.members("independent")}
    rows = [["member", "val plain", "val inherit", "val ind", "FLOPs plain", "FLOPs inherit", "of which teacher",
             "inherit reaches plain's loss at", "saving"]]
    for a, b in zip(plain.members("progressive"), inherit.members("progressive")):
        r = reached.get(a.name)
        at = "-" if r is None else sci(r.progressive_flops) if r.progressive_flops is not None else \
            f"not reached (+{r.gap:.4f})"
        saving = "-" if r is None or r.saving is None else f"{100 * r.saving:+.1f}%"
        ind = independent.get(a.name)
        rows.append([a.name, loss(a.val_loss), loss(b.val_loss), loss(ind.val_loss) if ind else "-",
                     sci(a.cum_flops), sci(b.cum_flops), sci(b.distill["flops"]) if b.distill else "-", at, saving])
    print(f"inherit: {inherit.distill['inherit']}")
    print("\n".join(text_table(rows)))
    print("FLOPs: cumulative 6ND of the progressive family through the member (teachers' forward passes included); "
          "saving: 1 - (inherit's FLOPs at the plain member's final loss) / (plain's FLOPs through the member)")
    return 0


if __name__ == "__main__":
    run(main)
