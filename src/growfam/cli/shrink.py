"""`growfam shrink`: prune a saved model to a smaller shape by importance, then optionally recover
it by distillation from the source (or by cross-entropy)."""

from __future__ import annotations

import argparse

from growfam.cli.building import parse_sets
from growfam.cli.defaults import default


def _whole_tokens(value: str) -> int:
    """--tokens: a whole number, written plainly or as 5e6."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of tokens, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")) or number < 0 or number != int(number):
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens ≥ 0, got {value!r}")
    return int(number)


def _add_shrink(sub) -> None:
    opt = "growfam.family.shrink:ShrinkOptions."
    p = sub.add_parser("shrink", help="prune a model directory to a smaller shape, then recover it by "
                                      "distillation (a member built downward)",
                       description="Score SRC_DIR's hidden channels, GQA groups, FFN neurons and layers on "
                                   "calibration windows of --data, keep the most important for the --to shape, "
                                   "and write OUT/model. With --recover kd (or ce) and --tokens N the pruned model "
                                   "then trains on N tokens, learning from SRC_DIR's distribution (or from the "
                                   "data alone). OUT also holds shrink.json (settings, parameters kept, held-out "
                                   "loss of the source, after pruning and after recovery), importance.json, and "
                                   "with recovery pruned/ and recovery/ (the run, resumed when the same command "
                                   "is given again).")
    p.add_argument("src_dir", metavar="SRC_DIR", help="the model to shrink: a Hugging Face Llama, Qwen2 or "
                                                      "Mistral directory, or a growfam checkpoint (its AdamW "
                                                      "moments are pruned too)")
    p.add_argument("--to", required=True, metavar="SHAPE",
                   help="the smaller shape: a preset, a model config file or directory, or FIELD=N,... over "
                        "d_model, n_layers, n_heads, n_kv_heads, ffn_dim (the rest stays the source's)")
    p.add_argument("--data", required=True, metavar="DATASET",
                   help="a prepared dataset made with SRC_DIR's tokenizer: calibration windows from its "
                        "training split, held-out loss on its validation split, recovery training")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to write (new or empty; see --force)")
    p.add_argument("--width", metavar="RULE",
                   help="how channels, groups and neurons are scored: importance (activations on the "
                        "calibration set, Minitron's), magnitude (weight norms) or random "
                        f"{default(opt + 'width')}")
    p.add_argument("--depth", metavar="RULE",
                   help="which layers go: contiguous (the run of layers with the least importance), "
                        f"importance (the least important layers) or none (keep the depth) {default(opt + 'depth')}")
    p.add_argument("--calibration", type=int, metavar="N",
                   help=f"calibration windows, run one at a time {default(opt + 'calibration')}")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="tokens per window: calibration, held-out loss, recovery (default: 256, or the source's "
                        "context when that is shorter)")
    p.add_argument("--recover", metavar="HOW",
                   help="kd: distil from SRC_DIR (forward KL, weight 1), ce: cross-entropy, none "
                        f"{default(opt + 'recover')}")
    p.add_argument("--tokens", type=_whole_tokens, metavar="N", help="recovery training tokens (5e6 is fine)")
    p.add_argument("--lr", type=float, metavar="LR", help="recovery peak learning rate "
                                                          f"{default('growfam.train.config:DEFAULT_MAX_LR')}")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help=f"recovery batch in sequences {default('growfam.train.config:TrainConfig.batch_size')}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other field of the recovery's train config (VALUE read as YAML), e.g. "
                        "warmup_frac=0.05, device=cuda, distill={temperature: 2}; repeatable")
    p.add_argument("--eval-windows", type=int, metavar="N",
                   help=f"validation windows of the held-out losses {default(opt + 'eval_windows')}")
    p.add_argument("--seed", type=int, help=f"seed of random scores and of the recovery run {default(opt + 'seed')}")
    p.add_argument("--force", action="store_true",
                   help="replace an existing shrink output at OUT (removed before the new one is built); "
                        "never anything else")
    p.set_defaults(func=_run_shrink)


def _run_shrink(args) -> int:
    """Under torchrun every rank trains the recovery; rank 0 alone prunes, writes and reports."""
    from growfam.family.shrink import ShrinkOptions, format_record, shrink_directory
    from growfam.train.parallel import init_distributed, rank_and_world

    init_distributed()
    main = rank_and_world()[0] == 0
    train = parse_sets(args.set)
    train.update({k: v for k, v in (("max_lr", args.lr), ("batch_size", args.batch_size)) if v is not None})
    given = {k: getattr(args, k) for k in ("width", "depth", "calibration", "seq_len", "recover", "tokens",
                                          "eval_windows", "seed") if getattr(args, k) is not None}
    opts = ShrinkOptions(**given, train=train)
    record = shrink_directory(args.src_dir, args.to, args.data, args.out, opts, force=args.force,
                              log=print if main else (lambda line: None), progress=main)
    if main:
        print(format_record(record))
        print(f"model: {args.out}/model")
    return 0
