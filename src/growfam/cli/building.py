"""The commands that build a family: info, plan, data prepare, train, family run/show, demo, report.

Each `_add_<command>(sub)` adds one subparser and sets its handler; handlers parse their flags
and make one call into the stage package that does the work (heavy imports inside handlers, so
`growfam --help` stays fast).
"""

from __future__ import annotations

import argparse
import os

from growfam import __version__
from growfam.cli.defaults import default


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the versions and devices growfam sees")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import torch
    import transformers

    print(f"growfam {__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"cuda: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    return 0


def _shipped_families() -> str:
    """The shipped family YAMLs' names, read from the folder (growfam.config would import
    every stage: `growfam --help` stays fast)."""
    from pathlib import Path

    return ", ".join(sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")))


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="token budgets, steps, FLOPs, LRs and GPU-hours of a family",
                       description="Plan a family under Independent and Progressive training: each "
                                   "member's token budget, steps, FLOPs, peak LR and GPU-hours "
                                   "(docs/concepts.md explains the allocation).")
    p.add_argument("family", nargs="?", default="paper-r2",
                   help=f"a shipped family ({_shipped_families()}) or a family YAML "
                        "(default: %(default)s)")
    p.add_argument("--members", nargs="+", metavar="MEMBER",
                   help="replace the family's members: preset names or model config paths")
    p.add_argument("--batch-size", nargs="+", type=int, metavar="SEQS",
                   help="global batch in sequences: one for every stage, or one per stage")
    p.add_argument("--chinchilla", type=float, metavar="R", help="tokens D(N) = R·20·N")
    p.add_argument("--count", choices=("nonembedding", "total", "nominal"),
                   help="which parameter count N is")
    p.add_argument("--peak-tflops", metavar="F", help=f"peak TFLOP/s of one GPU, dense bf16 {default('growfam.family.plan:DEFAULT_PEAK_TFLOPS')}: an H100 SXM")
    p.add_argument("--mfu", metavar="M", help=f"model FLOPs utilisation as a fraction {default('growfam.family.plan:DEFAULT_MFU')}")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--memory", action="store_true",
                   help="print each member's memory per GPU under FSDP2 instead (parameters, gradients, AdamW "
                        "moments, gathered copies, activations)")
    p.add_argument("--gpus", metavar="N", help=f"--memory: GPUs the model is sharded over {default('growfam.family.memory:DEFAULT_GPUS')}; under HSDP, "
                                                    "parallel.replicate R, the world size / R); every stage's batch "
                                                    "must split into N x whole micro-batches, as in training")
    p.add_argument("--micro-batch", metavar="B",
                   help="--memory: sequences per forward pass per GPU (default: the family's "
                        "train.micro_batch_size, else 1)")
    p.add_argument("--activation-checkpointing", nargs="?", const="1", metavar="N",
                   help="--memory: with every block's activations checkpointed, or every Nth block's "
                        "(parallel.activation_checkpointing)")
    p.add_argument("--loss-chunk", metavar="TOKENS",
                   help="--memory: the fused head and loss in chunks of TOKENS tokens (parallel.loss_chunk)")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from growfam.checks import as_int, as_number
    from growfam.config import load_family_config
    from growfam.errors import ConfigError
    from growfam.family import make_plan
    from growfam.report.tables import format_plan

    changes = {"members": args.members, "chinchilla": args.chinchilla, "count": args.count,
               "batch_size": args.batch_size[0] if args.batch_size and len(args.batch_size) == 1
               else args.batch_size}

    # each flag goes with one view: a flag the chosen view would ignore is refused, not dropped
    memory_only = {"--gpus": args.gpus, "--micro-batch": args.micro_batch, "--loss-chunk": args.loss_chunk,
                   "--activation-checkpointing": args.activation_checkpointing}
    plan_only = {"--json": args.json or None, "--peak-tflops": args.peak_tflops, "--mfu": args.mfu}
    for flag, value in (plan_only if args.memory else memory_only).items():
        if value is not None:
            raise ConfigError(f"{flag} does not go with {'--memory' if args.memory else 'the plan'}: "
                              + ("--memory prints the memory table only" if args.memory else "add --memory"))
    family = load_family_config(args.family).replace(**{k: v for k, v in changes.items() if v is not None})
    plan = make_plan(family)
    if args.memory:
        from growfam.family.memory import DEFAULT_GPUS
        from growfam.report.tables import format_memory

        gpus = as_int(args.gpus or DEFAULT_GPUS, "--gpus", 1)
        micro = as_int(args.micro_batch, "--micro-batch", 1) if args.micro_batch is not None else \
            as_int(family.train.micro_batch_size or 1, "train.micro_batch_size", 1)
        for stage in plan.stages:  # the split training needs (train.Schedule): no 1e12 GPUs for 960 sequences
            if stage.batch_size % (gpus * micro):
                raise ConfigError(f"stage {stage.name}'s batch of {stage.batch_size} sequences does not split into "
                                  f"--gpus {gpus} x whole micro-batches of {micro}")
        every = as_int(args.activation_checkpointing or 0, "--activation-checkpointing", 0)
        print(format_memory(family, gpus, micro, every, as_int(args.loss_chunk or 0, "--loss-chunk", 0)))
        return 0
    from growfam.family.plan import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS

    peak = as_number(args.peak_tflops or DEFAULT_PEAK_TFLOPS, "--peak-tflops", above=0)
    mfu = as_number(args.mfu or DEFAULT_MFU, "--mfu", above=0, at_most=1)
    print(json.dumps(plan.to_dict(peak, mfu), indent=2) if args.json else format_plan(plan, peak, mfu))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train one model from a train config (resumable)",
                       description="Train one model: AdamW, cosine schedule, checkpoints, spike guard. "
                                   "Resumes from OUT_DIR/checkpoints when there is one.")
    p.add_argument("config", help="a train config YAML (fields of growfam.train.TrainConfig)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="--resume requires a checkpoint to continue; --no-resume refuses to touch an "
                        "out_dir that has one (default: resume when there is one)")
    p.add_argument("--max-steps", type=int, metavar="N", help="run length in optimizer steps")
    p.add_argument("--max-tokens", type=float, metavar="N", help="run length in tokens")
    p.add_argument("--out-dir", metavar="DIR", help="output directory")
    p.add_argument("--data", metavar="DIR", help="prepared dataset directory")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other config key (VALUE is read as YAML); repeatable")
    p.set_defaults(func=_run_train)


def parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE items as a mapping (each VALUE read as YAML); a ConfigError for a bad one."""
    import yaml

    from growfam.errors import ConfigError

    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            data[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item}: malformed YAML value ({problem})") from None
    return data


def _run_train(args) -> int:
    from growfam.errors import ConfigError
    from growfam.io import read_yaml
    from growfam.train import TrainConfig, init_distributed, train

    init_distributed()
    data = read_yaml(args.config)
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: a train config must be a mapping")
    data.update(parse_sets(args.set))
    if args.max_steps is not None:  # one run length replaces the other
        data.update(max_steps=args.max_steps, max_tokens=None)
    if args.max_tokens is not None:
        data.update(max_tokens=args.max_tokens, max_steps=None)
    data.update({k: v for k, v in (("out_dir", args.out_dir), ("data", args.data), ("device", args.device))
                 if v is not None})
    result = train(TrainConfig.from_dict(data), resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only rank 0 reports
        return 0
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
    train_loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
    print(f"steps {result.steps}  tokens {result.tokens:,}  train loss {train_loss}  val loss {val}  "
          f"FLOPs {result.flops:.3e} (attention-incl. {result.flops_attn:.3e}"
          + (f"; teacher {result.flops_teacher:.3e}" if result.flops_teacher else "") + f")  {result.wall_s:.0f} s")
    print(f"model: {result.hf_dir}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (tokenise once into a dataset directory)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    prep = data_sub.add_parser("prepare", help="tokenise a source into memory-mapped token files",
                               description="Tokenise a source once, in parallel, into OUT: token files "
                                           "for the train and val splits, index.json and the tokenizer.")
    prep.add_argument("source", help="'embedded' (Python stdlib sources and docs), a .txt/.jsonl/.parquet "
                                     "file or folder, or hf:NAME[:CONFIG[:SPLIT]]")
    prep.add_argument("--tokenizer",
                      help="gpt2, a Hugging Face tokenizer directory, or train:VOCAB to train a byte-level "
                           f"BPE on the source {default('growfam.data.preparation:DEFAULT_TOKENIZER')}")
    prep.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    # Numbers stay text here: prepare() checks them (NaN, inf, bounds) with one clear line.
    prep.add_argument("--val-fraction", metavar="F",
                      help="share of documents held out for validation, chosen by hash "
                           f"{default('growfam.data.preparation:DEFAULT_VAL_FRACTION')}")
    prep.add_argument("--workers", metavar="N",
                      help="worker processes, or threads when the source has fewer than 2N units (default: all CPUs)")
    prep.add_argument("--max-tokens", metavar="N", help="stop after about N tokens (1e6 is fine)")
    prep.add_argument("--shard-tokens", metavar="N",
                      help="tokens per token file, at most about; a unit of work is about 4N bytes of text "
                           f"{default('growfam.data.preparation:SHARD_TOKENS')}")
    prep.add_argument("--part", metavar="I/N",
                      help="prepare only part I of N (counted from 0) into OUT.partial, e.g. one per machine "
                           "on a shared file system; then `growfam data merge OUT`")
    prep.add_argument("--text-field", default="text", help="JSONL/Parquet/HF text field (default: %(default)s)")
    prep.add_argument("--force", action="store_true",
                      help="replace OUT if it exists (only once the new dataset is complete), or start an "
                           "unfinished preparation with other settings again")
    prep.set_defaults(func=_run_data_prepare)
    merge = data_sub.add_parser("merge", help="make one dataset of the parts prepared with --part",
                                description="Write OUT/index.json over the token files every part wrote into "
                                            "OUT.partial (no copy) and rename it to OUT.")
    merge.add_argument("out", metavar="OUT", help="the --out the parts were given")
    merge.add_argument("--force", action="store_true", help="replace OUT if it exists")
    merge.set_defaults(func=_run_data_merge)


def _run_data_prepare(args) -> int:
    from growfam.data import DEFAULT_TOKENIZER, open_source, prepare

    # prepare() owns the defaults: a flag left out is not passed
    given = {key: value for key, value in (("val_fraction", args.val_fraction), ("shard_tokens", args.shard_tokens),
                                            ("part", args.part)) if value is not None}
    ds = prepare(open_source(args.source, text_field=args.text_field), DEFAULT_TOKENIZER if args.tokenizer is None else args.tokenizer,
                 args.out, workers=args.workers, max_tokens=args.max_tokens, overwrite=args.force, **given)
    if ds is not None:
        _print_dataset(ds)
    return 0


def _run_data_merge(args) -> int:
    from growfam.data import merge

    _print_dataset(merge(args.out, overwrite=args.force))
    return 0


def _print_dataset(ds) -> None:
    print(f"{ds.path}: train {ds.num_tokens('train'):,} tokens ({ds.num_documents('train'):,} documents), "
          f"val {ds.num_tokens('val'):,} tokens ({ds.num_documents('val'):,} documents), "
          f"vocab {ds.vocab_size:,} ({ds.dtype.name}), {len(ds.shards('train')):,} train shard(s)")


def _add_family(sub) -> None:
    p = sub.add_parser("family", help="build a whole family: progressive, independent, or both")
    fam = p.add_subparsers(dest="family_command", metavar="ACTION", required=True)
    run = fam.add_parser("run", help="train every member (resumable: repeat the command to continue)",
                         description="Plan the family, train stage 1, expand, train stage 2, ... "
                                     "Members land in OUT/<mode>/<member>/ as Hugging Face directories; "
                                     "OUT/family.json is the ledger.")
    run.add_argument("family", help="a shipped family name (tiny, paper-r2, ...) or a family YAML")
    run.add_argument("--mode", choices=("progressive", "independent", "shrink", "both"), default=None,
                     help="which members to build: progressive (grown; a grow family's default), shrink "
                          "(pruned downward; a shrink family's default), independent (from scratch), or both "
                          "(the family's direction and independent)")
    run.add_argument("--out", default=None, metavar="DIR", help="output directory (default: family/<name>)")
    run.add_argument("--data", metavar="DIR", help="prepared dataset (default: the YAML's data: section)")
    run.add_argument("--fixed-data", action="store_true",
                     help="cap unique tokens at the largest member's from-scratch budget, then repeat them")
    run.add_argument("--eval", action="store_true",
                     help="evaluate each member once it is published (perplexity, zero-shot tasks, as the "
                          "YAML's eval: section says) and the members' consistency at the end. A YAML with "
                          "a posttrain: section ends with `growfam posttrain` of the family")
    run.set_defaults(func=_run_family)
    show = fam.add_parser("show", help="print the comparison table of a family directory")
    show.add_argument("out", metavar="DIR")
    show.set_defaults(func=_run_family_show)


def _modes(mode: str | None) -> str | tuple[str, ...]:
    """--mode as check_family takes it: None is the family's own direction ("built")."""
    return "built" if mode is None else mode if mode == "both" else (mode,)


def _build_family(family: str, out: str | None, data: str | None, modes: tuple[str, ...],
                  fixed_data: bool = False, evaluate: str | None = None) -> int:
    """Plan, check everything, prepare the data if needed, build every member, print the comparison.

    evaluate: None, "eval" (`--eval`: the eval section, refused without lm_eval when it names
    tasks) or "demo" (the same, the zero-shot tasks dropped without lm_eval); then the tables.
    Under torchrun every rank trains; rank 0 alone prepares data, evaluates and prints."""
    from contextlib import ExitStack
    from pathlib import Path

    from growfam.config import load_family_config
    from growfam.data.config import dataset_dir, ensure_dataset
    from growfam.family import FamilyDirectory, check_family, run_family
    from growfam.lock import folder_lock
    from growfam.report.tables import format_comparison
    from growfam.train.parallel import init_distributed, on_main, rank_and_world

    init_distributed()
    main = rank_and_world()[0] == 0

    config = load_family_config(family)
    out_dir = Path(out or f"family/{config.name}")
    check_family(config, out_dir, modes, fixed_data)  # before data preparation, which may take long
    posttrain = _posttrain_section(config.posttrain)
    evaluator = None
    if evaluate:
        from growfam.eval.run import FamilyEval

        evaluator = on_main(lambda: FamilyEval(config.eval, out_dir, optional_harness=evaluate == "demo"))
    path, prepare = dataset_dir(config.data, data, FamilyDirectory(out_dir).data)
    with ExitStack() as held:
        if prepare:  # it writes into the family directory: hold its lock from here (else run_family takes it)
            on_main(lambda: held.enter_context(folder_lock(out_dir, "; the family's members and ledger go there")))
            on_main(lambda: ensure_dataset(config.data, data, FamilyDirectory(out_dir).data, config.start_from))
        ledger = run_family(config, out_dir, data=path, modes=modes, fixed_data=fixed_data, on_member=evaluator)
    if not main:
        return 0
    print()
    print(format_comparison(ledger))
    if evaluator is not None:
        from growfam.eval.tables import format_consistency, format_eval

        members, consistency = evaluator.finish()
        for table in ([format_eval(members)] if members else []) + ([format_consistency(consistency)] if consistency else []):
            print()
            print(table)
    if posttrain is not None:
        from growfam.posttrain import run_posttrain
        from growfam.report.posttrain import format_posttrain

        settings, options = posttrain
        print()
        print(format_posttrain(run_posttrain(out_dir, settings, **options)))
    return 0


def _posttrain_section(section: dict | None):
    """The YAML's `posttrain:` section checked, before any work: (PosttrainConfig, options) or
    None; refused under torchrun (post-training runs in one process)."""
    if section is None:
        return None
    from growfam.errors import ConfigError
    from growfam.posttrain.config import posttrain_section
    from growfam.train.parallel import rank_and_world

    if rank_and_world()[1] > 1:
        raise ConfigError("the family's posttrain: section runs in one process: remove it and run "
                          "`growfam posttrain FAMILY_DIR` after this torchrun")
    return posttrain_section(section)


def _run_family(args) -> int:
    return _build_family(args.family, args.out, args.data, _modes(args.mode), args.fixed_data,
                         "eval" if args.eval else None)


def _run_family_show(args) -> int:
    from pathlib import Path

    from growfam.errors import ConfigError
    from growfam.family import LEDGER, read_ledger
    from growfam.report.tables import format_comparison

    ledger = read_ledger(Path(args.out))
    if ledger is None:
        raise ConfigError(f"{args.out}: no {LEDGER} (not a family directory)")
    print(format_comparison(ledger))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a tiny four-member family both ways on the CPU (about 8 min on 2 cores, 3 more to post-train)",
                       description="Prepare the embedded corpus (the Python standard library), then build "
                                   "the `tiny` family progressively and independently, evaluate every member "
                                   "(perplexity, the paper's zero-shot tasks on a few examples when lm_eval is "
                                   "installed) and compare them, consistency included; then post-train the "
                                   "largest member of each mode (SFT, DPO, MT-Bench answers) when the "
                                   "[posttrain] extra is installed.")
    p.add_argument("--out", default="growfam-demo", metavar="DIR")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from growfam.io import check_folder, check_output
    from growfam.outputs import REPORT
    from growfam.family import FamilyDirectory
    from growfam.cli.posttrain import demo_posttrain
    from growfam.report.run import write_report

    folder = FamilyDirectory(args.out).report  # an earlier demo's report is replaced; nothing else is
    check_folder(args.out, "--out")
    check_output(folder, force=True, makes=REPORT, what="the demo's report folder")
    _build_family("tiny", args.out, None, ("progressive", "independent"), evaluate="demo")
    demo_posttrain(args.out)
    _print_report(write_report([args.out], folder, force=True))
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write REPORT.md and figures (Figure 2, FLOPs to equal loss, Tables 1-5) "
                                      "of one family directory or several side by side",
                       description="Read each family directory (family.json, every stage's metrics.jsonl, "
                                   "evaluation, consistency and speculative results where present) and write "
                                   "REPORT.md with PNG figures: validation loss against cumulative FLOPs "
                                   "(the paper's Figure 2), training curves, FLOPs to equal loss, the paper's "
                                   "tables, the plan and the growth steps. A section whose data is missing "
                                   "says which command produces it. Several families: their Figure 2 "
                                   "overlaid and their headline figures side by side.")
    p.add_argument("families", nargs="+", metavar="FAMILY_DIR", help="a family directory (growfam family run --out)")
    p.add_argument("--out", metavar="DIR",
                   help="the report's folder, new or empty (default: FAMILY_DIR/report; required for several)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out (the old one is kept until the new one is complete)")
    p.set_defaults(func=_run_report)


def _print_report(report) -> None:
    print()
    print(f"report: {report.path} (figures: {', '.join(f for f in report.files if f.endswith('.png')) or 'none'})")
    for label, lines in report.headlines:
        print(f"{label}:")
        for line in lines:
            print(f"  {line}")


def _run_report(args) -> int:
    from growfam.report.run import write_report

    _print_report(write_report(args.families, args.out, args.force))
    return 0
