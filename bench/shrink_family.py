"""A family built downward next to the same family built upward, at equal total FLOPs.

Given a family directory built in both modes, this trains the largest member from scratch on
what the Progressive family spent in all, minus what the recoveries will cost; then prunes each
smaller member from the one above (or from the largest) by activation importance and recovers
it by distillation from its source on `--recovery` × its from-scratch token budget, with its
stage's batch, sequence length and learning rates. The recoveries' FLOPs count the student
(6·N·D) and the teacher (2·N_t·D), N non-embedding as the family's ledger counts them.

Then every member of the three families — Progressive, Independent, Shrink — is measured the
same way: held-out loss on the same validation windows, and for each adjacent pair KL in both
directions and Σ min(p, q), the expected acceptance of a speculative draft at temperature 1.

    python bench/shrink_family.py family/tiny --recovery 0.1
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _script import run
from growfam.config import load_family_config
from growfam.data import TokenDataset
from growfam.errors import GrowfamError
from growfam.eval.consistency import divergence
from growfam.family import make_plan
from growfam.family.shrink import ShrinkOptions, held_out_loss, shrink_directory
from growfam.family.stage import publish, stage_train_config
from growfam.model import load_pretrained
from growfam.text import text_table
from growfam.train import train


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
    parser.add_argument("--out", help="keep the shrink family here (default: a temporary folder)")
    args = parser.parse_args()
    root_in = Path(args.family)
    ledger_path = root_in / "family.json"
    if not ledger_path.is_file():
        raise GrowfamError(f"{root_in} holds no family.json")
    ledger = json.loads(ledger_path.read_text())
    family = load_family_config(args.config or ledger["plan"]["name"])
    plan, data = make_plan(family), str(root_in / "data")
    dataset = TokenDataset.open(data)
    built = {mode: ledger["modes"].get(mode, []) for mode in ("progressive", "independent")}
    if any(len(m) != len(plan.stages) or not all(e["done"] for e in m) for m in built.values()):
        raise GrowfamError(f"{root_in} must hold every member in both modes")
    names = [s.name for s in plan.stages]
    budget = built["progressive"][-1]["cum_flops"]
    teacher_of = {i: (i + 1 if args.source == "previous" else len(names) - 1) for i in range(len(names) - 1)}
    recovery_tokens = {i: round(args.recovery * plan.stages[i].tokens_independent) for i in teacher_of}
    planned = sum(t * (6 * plan.stages[i].params + 2 * plan.stages[teacher_of[i]].params)
                  for i, t in recovery_tokens.items())
    largest_tokens = (budget - planned) / (6 * plan.stages[-1].params)
    print(f"budget (the Progressive family's FLOPs): {budget:.4g}; recoveries {planned:.4g} "
          f"({planned / budget:.1%}); the largest trains on {largest_tokens:,.0f} tokens "
          f"({largest_tokens / plan.stages[-1].tokens_independent:.1%} of its from-scratch budget)", flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.out or scratch)
        dirs, spent = _build_downward(family, plan, data, dataset, root, largest_tokens, recovery_tokens,
                                      teacher_of, args)
        models = {mode: [load_pretrained(root_in / mode / n, dtype=torch.float32).eval() for n in names]
                  for mode in ("progressive", "independent")}
        models["shrink"] = [load_pretrained(d, dtype=torch.float32).eval() for d in dirs]
        totals = {"progressive": budget, "independent": sum(e["flops"] for e in built["independent"]),
                  "shrink": spent}
        _print_measurements(models, names, totals, dataset, family.seq_lens[-1], args.windows)
    return 0


def _build_downward(family, plan, data, dataset, root: Path, largest_tokens: float, recovery_tokens: dict,
                    teacher_of: dict, args) -> tuple[list[Path], float]:
    """Train the largest, prune and recover the others; (member directories in size order, FLOPs)."""
    last = len(plan.stages) - 1
    tcfg = stage_train_config(family, plan, last, "independent", data, root, largest_tokens, False)
    result = train(tcfg, dataset=dataset)
    dirs = {last: root / "shrink" / plan.stages[last].name}
    publish(result, dirs[last])
    spent = result.flops
    for i in range(last - 1, -1, -1):
        stage, member = plan.stages[i], family.members[i]
        shape = ",".join(f"{k}={getattr(member, k)}" for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                                               "ffn_dim"))
        opts = ShrinkOptions(calibration=args.calibration, seq_len=stage.seq_len, recover="kd",
                             tokens=recovery_tokens[i], train={**family.train.given, "batch_size": stage.batch_size,
                                                                "max_lr": stage.max_lr, "min_lr": stage.min_lr})
        record = shrink_directory(str(dirs[teacher_of[i]]), shape, data, str(root / "work" / stage.name), opts,
                                  log=lambda s: None, progress=False)
        dirs[i] = root / "work" / stage.name / "model"
        spent += record["recovery"]["flops"] + record["recovery"]["flops_teacher"]
        h = record["held_out"]
        print(f"{stage.name}: pruned {h['pruned']:.4f} -> recovered {h['recovered']:.4f} "
              f"({record['recovery']['tokens']:,} tokens)", flush=True)
    return [dirs[i] for i in range(last + 1)], spent


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
