"""A family built downward next to the same family built upward, at equal total FLOPs.

Given a family directory built in both modes, this builds the same family with `direction:
shrink` (`growfam family run`'s code): its largest member trains from scratch on what the
Progressive family spent in all, minus what the recoveries will cost; each smaller member is
pruned from the one above (or from the largest) by activation importance, with the AdamW
moments, and recovered by distillation from its source on `--recovery` × its from-scratch token
budget. Recoveries count the student (6·N·D) and the teacher (2·N_t·D), N non-embedding as the
family's ledger counts them.

Then every member of the three families — Progressive, Independent, Shrink — is measured the
same way: held-out loss on the same validation windows, and for each adjacent pair KL in both
directions and Σ min(p, q), the expected acceptance of a speculative draft at temperature 1.
`growfam report GROW_DIR SHRINK_DIR` then puts the two families side by side.

    python bench/shrink_family.py family/tiny --recovery 0.1 --out family/tiny-shrink
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from _script import run
from growfam.config import FamilyConfig, load_family_config
from growfam.data import TokenDataset
from growfam.errors import GrowfamError
from growfam.eval.consistency import divergence
from growfam.family import make_plan, run_family
from growfam.family.shrink import held_out_loss
from growfam.model import load_pretrained
from growfam.text import text_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="a family directory built in both modes (family.json, data/)")
    parser.add_argument("--config", help="its family config (default: the name in its ledger)")
    parser.add_argument("--recovery", type=float, default=0.1,
                        help="recovery tokens of each smaller member, as a share of its from-scratch budget")
    parser.add_argument("--from", dest="source", choices=("previous", "largest"), default="previous",
                        help="prune each member from the one above it, or every one from the largest")
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of every measurement")
    parser.add_argument("--out", required=True, help="the shrink family's directory")
    args = parser.parse_args()
    grown = Path(args.family)
    if not (grown / "family.json").is_file():
        raise GrowfamError(f"{grown} holds no family.json")
    ledger = json.loads((grown / "family.json").read_text())
    family = load_family_config(args.config or ledger["plan"]["name"])
    built = {mode: ledger["modes"].get(mode, []) for mode in ("progressive", "independent")}
    if any(len(m) != len(family.members) or not all(e["done"] for e in m) for m in built.values()):
        raise GrowfamError(f"{grown} must hold every member in both modes")
    budget = built["progressive"][-1]["cum_flops"]
    shrink = _equal_flops_family(family, budget, args)
    plan = make_plan(shrink)
    largest = plan.stages[-1]
    print(f"budget (the Progressive family's FLOPs): {budget:.4g}; recoveries {plan.flops_shrink - largest.flops_shrink:.4g}; "
          f"the largest trains on {largest.tokens_shrink:,.0f} tokens "
          f"({largest.tokens_shrink / make_plan(family).stages[-1].tokens_independent:.1%} of its from-scratch budget)",
          flush=True)
    result = run_family(shrink, args.out, data=str(grown / "data"), modes="shrink")
    names = [m.name for m in family.members]
    models = {mode: [load_pretrained(grown / mode / n, dtype=torch.float32).eval() for n in names]
              for mode in ("progressive", "independent")}
    models["shrink"] = [load_pretrained(Path(args.out) / "shrink" / n, dtype=torch.float32).eval() for n in names]
    totals = {"progressive": budget, "independent": sum(e["flops"] for e in built["independent"]),
              "shrink": sum(m.spent_flops for m in result.members("shrink"))}
    _print_measurements(models, names, totals, TokenDataset.open(grown / "data"), family.seq_lens[-1], args.windows)
    print(f"\nside by side: growfam report {grown} {args.out} --out REPORT_DIR")
    return 0


def _equal_flops_family(family: FamilyConfig, budget: float, args) -> FamilyConfig:
    """`family` built downward, its largest member's tokens set so that the whole family spends
    `budget` FLOPs (the recoveries' budgets stay shares of the members' from-scratch tokens)."""
    independent = [s.tokens_independent for s in make_plan(family).stages]
    spec = family.to_dict() | {"name": f"{family.name}-shrink", "direction": "shrink", "tokens": {"explicit": independent},
                               "shrink": {"from": args.source, "tokens": args.recovery, "calibration": args.calibration}}
    plan = make_plan(FamilyConfig.from_dict(spec))
    recoveries = plan.flops_shrink - plan.stages[-1].flops_shrink
    spec["tokens"] = {"explicit": [*independent[:-1], (budget - recoveries) / (6 * plan.stages[-1].params)]}
    return FamilyConfig.from_dict(spec)


def _print_measurements(models: dict, names: list[str], totals: dict, dataset, seq_len: int, windows: int) -> None:
    val = dataset.tokens("val")
    modes = list(models)
    rows = [["member", *(f"{m} held-out loss" for m in modes)]]
    for i, name in enumerate(names):
        rows.append([name, *(f"{held_out_loss(models[m][i], val, seq_len, windows):.4f}" for m in modes)])
    rows.append(["total FLOPs", *(f"{totals[m]:.4g}" for m in modes)])
    print("\n".join(text_table(rows)))
    rows = [["pair", *(f"{m} {what}" for m in modes for what in ("KL(s||l)", "KL(l||s)", "Σmin"))]]
    for i in range(len(names) - 1):
        cells = []
        for m in modes:
            d = divergence(models[m][i], models[m][i + 1], val, seq_len, windows)
            cells += [f"{d.kl_small_large:.4f}", f"{d.kl_large_small:.4f}", f"{d.acceptance:.4f}"]
        rows.append([f"{names[i]} -> {names[i + 1]}", *cells])
    print("\n".join(text_table(rows)))


if __name__ == "__main__":
    run(main)
