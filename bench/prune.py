"""Pruning a trained member to a smaller shape by three importance rules, in one run: the
held-out loss of the source, and of the pruned model right after pruning (no recovery
training) under activation importance (Minitron's, on calibration windows of the training
split), weight magnitude and random scores, each with contiguous and importance-ranked depth
pruning.

    python bench/prune.py family/tiny/progressive/tiny-4 --to tiny-3 --data family/tiny/data
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from growfam.data import TokenDataset, eval_windows
from growfam.grow import activation_importance, magnitude_importance, prune, random_importance, select
from growfam.model import load_pretrained, resolve_config
from _script import run
from growfam.text import text_table


@torch.no_grad()
def held_out(model, tokens, seq_len: int, windows: int) -> float:
    """Mean validation loss (nats per token) over `windows` evenly spread windows."""
    total = count = 0
    for x, y in eval_windows(tokens, seq_len, windows, 8):
        total, count = total + model.loss(x, y).item() * len(x), count + len(x)
    return total / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a trained model directory")
    parser.add_argument("--to", required=True, help="the smaller shape: a preset or a model config")
    parser.add_argument("--data", required=True, help="the prepared dataset it was trained on")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=256, help="calibration windows (batch 1)")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows")
    args = parser.parse_args()
    source = load_pretrained(args.source, dtype=torch.float32).eval()
    target = resolve_config(args.to).replace(vocab_size=source.cfg.vocab_size, head_dim=source.cfg.head_dim)
    select(random_importance(source.cfg), source.cfg, target)  # a target that does not fit: refused before any work
    dataset = TokenDataset.open(args.data)
    val = dataset.tokens("val")
    calibration = torch.cat([x for x, _ in eval_windows(dataset.tokens("train"), args.seq_len, args.calibration, 64)])
    start = time.perf_counter()
    rules = {"activation": activation_importance(source, calibration), "magnitude": magnitude_importance(source),
             "random": random_importance(source.cfg, seed=0)}
    print(f"importance: {time.perf_counter() - start:.1f} s ({len(calibration)} calibration windows of "
          f"{args.seq_len} tokens)", file=sys.stderr)
    rows = [["width rule", "depth rule", "held-out loss"],
            ["(source)", "", f"{held_out(source, val, args.seq_len, args.windows):.4f}"]]
    for name, importance in rules.items():
        for depth in ("contiguous", "importance"):
            pruned = prune(source, select(importance, source.cfg, target, depth=depth)).eval()
            rows.append([name, depth, f"{held_out(pruned, val, args.seq_len, args.windows):.4f}"])
    print(f"{args.source} -> {args.to}: {sum(p.numel() for p in source.parameters()):,} -> "
          f"{sum(p.numel() for p in pruned.parameters()):,} parameters; no recovery training")
    print("\n".join(text_table(rows)))
    return 0


if __name__ == "__main__":
    run(main)
