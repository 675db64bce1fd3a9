"""`growfam expand`: grow saved model directories (the growth operators outside a family run)."""

from __future__ import annotations

from growfam.cli.defaults import default


def _add_expand(sub) -> None:
    p = sub.add_parser("expand", help="grow a Hugging Face model directory (or several, combined) "
                                      "into a larger config",
                       description="Expand SRC_DIR (a Hugging Face Llama directory) in width and depth "
                                   "into --to, write the grown model to --out and print the growth "
                                   "report. With several SRC_DIRs, combine them into one model first "
                                   "(--combine), then grow that; the first is the primary: its "
                                   "embedding, head and tokenizer files go to --out, so the sources' "
                                   "tokenizer files must be identical. An unknown operator name lists "
                                   "the known ones.")
    p.add_argument("src_dirs", nargs="+", metavar="SRC_DIR",
                   help="the model to grow, or several to combine (the first is the primary)")
    p.add_argument("--to", required=True, metavar="CONFIG_OR_PRESET",
                   help="target: a preset name, a model config YAML/JSON or a model directory")
    p.add_argument("--combine", metavar="MODE",
                   help="several SRC_DIRs only: depth interleaves their layers (equal widths), width "
                        f"concatenates their units (equal depths) {default('growfam.grow.multi:DEFAULT_COMBINE')}")
    p.add_argument("--width", help=f"width operator {default('growfam.grow.growth:DEFAULT_WIDTH')}")
    p.add_argument("--depth", help=f"depth operator {default('growfam.grow.growth:DEFAULT_DEPTH')}")
    p.add_argument("--seed", type=int, default=0, help="seed of the index maps and random fills")
    p.add_argument("--probe-tokens", type=int, default=512, metavar="N",
                   help="measure Δlogits and Δloss on N seeded random tokens (0: skip) (default: %(default)s)")
    p.add_argument("--report", metavar="FILE", help="also write the report as JSON")
    p.add_argument("--out", required=True, metavar="DST_DIR",
                   help="directory to write (new or empty; see --force)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (directory or file) and --report; the old one "
                        "is kept until the new one is complete. Never a source directory.")
    p.set_defaults(func=_run_expand)


def _run_expand(args) -> int:
    from growfam.grow.directories import expand_directories

    path, report = expand_directories(args.src_dirs, args.to, args.out, width=args.width, depth=args.depth,
                                      combine=args.combine, seed=args.seed, probe_tokens=args.probe_tokens,
                                      report=args.report, force=args.force)
    print(report)
    print(f"model: {path}")
    return 0
