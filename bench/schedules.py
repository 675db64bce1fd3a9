"""A family under four learning-rate schedules, in one run: cosine (growing from the decayed
member), WSD growing from the decayed member, WSD growing from the stable checkpoint (each member
published from its stage's decay), and a constant LR with checkpoint averaging (each member
published as the mean of its stage's last checkpoints, the next grown from the last state).

Each schedule's family is built in both modes with the same seeds; the independent baseline
trains on the same schedule (both WSD variants share one). Printed: every member's validation
loss, and the largest member's FLOPs to equal loss against its own schedule's independent
baseline (the FLOPs at which the progressive curve reaches the independent largest's final
validation loss).

    python bench/schedules.py --family tiny --chinchilla 0.1 --out runs/schedules
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _script import run
from growfam.config import FamilyConfig, load_family_config
from growfam.data.config import dataset_dir, ensure_dataset
from growfam.family import FamilyDirectory, run_family
from growfam.family.ledger import read_ledger
from growfam.report.curves import member_curves
from growfam.report.equal_flops import flops_to_equal_loss
from growfam.text import loss, text_table

#: name -> (lr: section changes, growth.from, train: section changes); "wsd-stable" takes its
#: independent baseline from "wsd-decayed" (the same schedule).
SCHEDULES = {
    "cosine": ({}, "decayed", {}),
    "wsd-decayed": ({"schedule": "wsd", "decay": 0.2}, "decayed", {}),
    "wsd-stable": ({"schedule": "wsd", "decay": 0.2}, "stable", {}),
    "constant-average": ({"schedule": "constant"}, "decayed", {"average": {"last": 4, "every": 10}}),
}
SHARED_BASELINE = {"wsd-stable": "wsd-decayed"}


def family_under(base: FamilyConfig, name: str, chinchilla: float, lr_policy: dict | None) -> FamilyConfig:
    lr, source, train = SCHEDULES[name]
    spec = base.to_dict()
    spec.update(name=f"{base.name}-{name}", tokens={"chinchilla": chinchilla})
    spec["lr"] = {**(lr_policy or spec["lr"]), **lr}
    spec["growth"] = {**spec["growth"], "from": source}
    spec["train"] = {**spec["train"], **train}
    return FamilyConfig.from_dict(spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="tiny", help="a shipped family or a family YAML")
    parser.add_argument("--chinchilla", type=float, default=0.1, help="D(N) = R·20·N (0.1: 2 tokens per parameter)")
    parser.add_argument("--lr", choices=("fixed", "linear"), default="fixed",
                        help="the family's own max LR for every stage (fixed), or the paper's adjustment: 2x it "
                             "for the smallest down to 1x for the largest (linear, as paper-r2-lr)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="which, comma-separated")
    parser.add_argument("--data", help="a prepared dataset (default: prepared into OUT/data from the family's data: section)")
    parser.add_argument("--out", required=True, help="a folder for the families (reused: finished members are kept)")
    parser.add_argument("--baseline", metavar="DIR",
                        help="train progressive families only and compare with the independent ones of an earlier "
                             "run of this benchmark in DIR (e.g. --lr fixed's: under --lr linear the largest member "
                             "has the same max LR, so the FLOPs to equal loss compare against the same baseline)")
    args = parser.parse_args()
    base = load_family_config(args.family)
    names = [n for n in args.schedules.split(",") if n]
    unknown = sorted(set(names) - set(SCHEDULES))
    if unknown:
        raise SystemExit(f"unknown schedule(s) {unknown}; known: {', '.join(SCHEDULES)}")
    peak = base.lr.max_lrs([1.0])[0]
    lr_policy = {"policy": "linear", "start": 2 * peak, "end": peak} if args.lr == "linear" else None
    root = Path(args.out)
    families = {n: family_under(base, n, args.chinchilla, lr_policy) for n in names}
    data, prepare = dataset_dir(base.data, args.data, root / "data")
    if prepare:
        ensure_dataset(base.data, args.data, root / "data", None)
    for name, family in families.items():
        modes = ("progressive",) if name in SHARED_BASELINE or args.baseline else ("progressive", "independent")
        print(f"== {name}", flush=True)
        run_family(family, root / name, data=str(data), modes=modes)
    members = [m.name for m in base.members]
    base_root = Path(args.baseline) if args.baseline else root
    ind = "ind (baseline)" if args.baseline else "ind"
    rows = [["schedule", *(f"{m} prog / {ind}" for m in members), f"{members[-1]} FLOPs to equal loss"]]
    for name in names:
        ledger = read_ledger(root / name)
        baseline = read_ledger(base_root / SHARED_BASELINE.get(name, name))
        prog, ind = ledger.members("progressive"), baseline.members("independent")
        cells = [f"{loss(p.val_loss)} / {loss(i.val_loss)}" for p, i in zip(prog, ind)]
        curves_p = member_curves(FamilyDirectory(root / name).root, ledger, "progressive")[0]
        curves_i = member_curves(base_root / SHARED_BASELINE.get(name, name), baseline, "independent")[0]
        results = flops_to_equal_loss(curves_p, curves_i)
        last = results[-1] if results else None
        rows.append([name, *cells, "-" if last is None else f"{100 * last.saving:.1f}% fewer" if last.saving is not None
                     else f"not reached ({last.gap:+.4f})"])
    print(f"\n{args.family} at {args.chinchilla:g}x Chinchilla, max LR {args.lr}:")
    print("\n".join(text_table(rows)))
    return 0


if __name__ == "__main__":
    run(main)
