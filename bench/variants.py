"""Distilled variants against the members they came from (a family built with `distill:
{retro: ..., draft: ...}`): for each variant, before (its member) and after (the variant), on
the same validation windows and prompts:

- the validation loss (from the ledger),
- KL(teacher ‖ student) and Σ_v min(p, q) (the expected speculative acceptance, 1 − total
  variation) to its teacher, averaged over `--windows` validation windows of `--window` tokens,
- for a draft variant: α, the share of drafted tokens the teacher accepts, in speculative
  sampling (temperature 1, k = 4) of `--new-tokens` tokens after each of `--prompts` prompts,
- the FLOPs it cost (student 6ND + teacher forwards).

    growfam family run /tmp/tiny-variants.yaml --mode both --out family/tiny   # tiny.yaml + a distill: section
    python bench/variants.py family/tiny
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from growfam.data import TokenDataset
from growfam.eval.consistency import divergence
from growfam.family.directory import FamilyDirectory
from growfam.family.ledger import read_ledger
from growfam.infer.generate import Generation, speculative_generate
from growfam.infer.speculate import cut_prompts
from growfam.model import load_pretrained
from _script import run
from growfam.text import loss, sci, text_table


def alpha(draft, target, prompts: torch.Tensor, new_tokens: int, seed: int) -> float:
    """Accepted / verified draft tokens over every prompt (sampling at temperature 1, k 4)."""
    total, generator = Generation(), torch.Generator().manual_seed(seed)
    for prompt in prompts:
        total.add(speculative_generate(target, draft, prompt.tolist(), k=4, max_new_tokens=new_tokens,
                                       temperature=1.0, generator=generator))
    return total.accepted / total.verified if total.verified else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", type=Path)
    parser.add_argument("--windows", type=int, default=64, help="validation windows per pair")
    parser.add_argument("--window", type=int, default=128, help="tokens per window")
    parser.add_argument("--prompts", type=int, default=8, help="draft variants: prompts decoded")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    ledger = read_ledger(args.family)
    if ledger is None or not ledger.variants:
        print(f"{args.family}: not a family directory with distilled variants", file=sys.stderr)
        return 2
    val = TokenDataset.open(ledger.data).tokens("val")
    prompts = cut_prompts(val, args.prompts, args.prompt_tokens)
    directory = FamilyDirectory(args.family)
    rows = [["mode", "variant", "teacher", "val before", "val after", "KL before", "KL after", "Σmin before",
             "Σmin after", "α before", "α after", "FLOPs"]]
    for mode, entries in ledger.variants.items():
        for entry in entries:
            base = ledger.member(mode, entry.extra["of"])
            teacher = load_pretrained(directory.member(mode, entry.extra["teacher_member"])).eval()
            student = {"before": load_pretrained(directory.member(mode, base.name)).eval(),
                       "after": load_pretrained(directory.member(mode, entry.name)).eval()}
            div = {k: divergence(m, teacher, val, args.window, args.windows) for k, m in student.items()}
            with torch.no_grad():
                a = {k: alpha(m, teacher, prompts, args.new_tokens, seed=0) for k, m in student.items()} \
                    if entry.extra["kind"] == "draft" else None
            rows.append([mode, entry.name, entry.extra["teacher_member"], loss(base.val_loss), loss(entry.val_loss),
                         f"{div['before'].kl_large_small:.4f}", f"{div['after'].kl_large_small:.4f}",
                         f"{div['before'].acceptance:.4f}", f"{div['after'].acceptance:.4f}",
                         f"{a['before']:.3f}" if a else "-", f"{a['after']:.3f}" if a else "-",
                         sci(entry.spent_flops)])
            print(" ".join(rows[-1]), file=sys.stderr)
    print("\n".join(text_table(rows)))
    print(f"KL: KL(teacher ‖ student); Σmin: Σ_v min(p, q), on {args.windows} validation windows of {args.window} "
          f"tokens; α: accepted / verified drafts, T 1, k 4, {args.prompts} prompts × {args.new_tokens} new tokens; "
          "FLOPs: the variant's run, student 6ND + teacher forwards")
    return 0


if __name__ == "__main__":
    run(main)
