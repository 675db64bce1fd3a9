"""Shrinking a trained member to a smaller shape, in one run, through `growfam shrink`'s code:

- (a) importance rules: activation importance (Minitron's, on calibration windows of the
  training split), weight magnitude and random scores — the held-out loss right after pruning
  and after the same recovery budget (distillation from the source);
- (b) recovery by distillation (forward KL from the source, weight 1) against recovery by
  cross-entropy, at equal tokens;
- depth: contiguous against importance-ranked layer removal, right after pruning.

For scale, the family's own members of the target's size are measured the same way (their
training tokens beside them). Every figure is the held-out loss on the same validation windows.

    python bench/shrink.py family/tiny/progressive/tiny-4 --to tiny-3 --data family/tiny/data \\
        --family family/tiny --tokens 1e5,3e5
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _script import run
from growfam.data import TokenDataset
from growfam.family.shrink import ShrinkOptions, check_shrink, held_out_loss, shrink_directory
from growfam.model import load_pretrained
from growfam.text import text_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a trained model directory")
    parser.add_argument("--to", required=True, help="the smaller shape: a preset, a model config or FIELD=N,...")
    parser.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    parser.add_argument("--family", help="a family directory whose members of the target's name are measured too")
    parser.add_argument("--tokens", default="1e5,3e5", help="recovery budgets in tokens, comma-separated")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=256, help="calibration windows (batch 1)")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows")
    parser.add_argument("--lr", type=float, default=1e-3, help="recovery peak learning rate")
    parser.add_argument("--batch-size", type=int, default=16, help="recovery batch in sequences")
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    budgets = [int(float(t)) for t in args.tokens.split(",")]
    train = {"max_lr": args.lr, "batch_size": args.batch_size, "eval_every": 0, "tensorboard": False,
             "ckpt_every": 0}
    base = dict(calibration=args.calibration, seq_len=args.seq_len, eval_windows=args.eval_windows)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        check_shrink(args.source, args.to, args.data, str(root / "check"), ShrinkOptions(**base))  # before any work
        runs = [(w, "contiguous", how, t) for t in budgets for how in ("kd", "ce") for w in
                (("importance", "magnitude", "random") if how == "kd" else ("importance",))]
        runs += [("importance", "importance", "none", 0)]
        rows = [["width rule", "depth rule", "recovery", "tokens", "after pruning", "after recovery",
                 "recovery FLOPs (student + teacher)"]]
        record = None
        for width, depth, how, tokens in runs:
            opts = ShrinkOptions(**base, width=width, depth=depth, recover=how, tokens=tokens,
                                 train=train if how != "none" else {})
            name = f"{width}-{depth}-{how}-{tokens}"
            record = shrink_directory(args.source, args.to, args.data, str(root / name), opts,
                                      log=lambda s: None, progress=False)
            recovery = record["recovery"]
            rows.append([width, depth, how, f"{tokens:,}" if tokens else "-", f"{record['held_out']['pruned']:.4f}",
                         f"{record['held_out']['recovered']:.4f}" if recovery else "-",
                         f"{recovery['flops']:.3g} + {recovery['flops_teacher']:.3g}" if recovery else "-"])
            print(f"done: {name}", flush=True)
    p = record["params"]
    print(f"\n{args.source} -> {args.to}: {p['source_total']:,} -> {p['pruned_total']:,} parameters "
          f"({p['source_nonembedding']:,} -> {p['pruned_nonembedding']:,} non-embedding); "
          f"source held-out loss {record['held_out']['source']:.4f}")
    print("\n".join(text_table(rows)))
    if args.family:
        _family_members(Path(args.family), record["target_config"]["name"], args)
    return 0


def _family_members(family: Path, name: str, args) -> None:
    """The family's members called `name`, measured on the same held-out windows."""
    import json

    ledger = json.loads((family / "family.json").read_text())
    val = TokenDataset.open(args.data).tokens("val")
    rows = [["family member", "its training tokens", "FLOPs to have it (cumulative)", "held-out loss"]]
    for mode, entries in ledger["modes"].items():
        for entry in entries:
            if entry["name"] == name and entry.get("done"):
                model = load_pretrained(family / mode / name, dtype=torch.float32).eval()
                rows.append([f"{mode}/{name}", f"{entry['tokens']:,}", f"{entry['cum_flops']:.3g}",
                             f"{held_out_loss(model, val, args.seq_len, args.eval_windows):.4f}"])
    print("\n".join(text_table(rows)))


if __name__ == "__main__":
    run(main)
