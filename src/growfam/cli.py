"""`growfam` command line: one parser, one subcommand per job.

Every handler raises GrowfamError for bad input; `main` prints it as one line on stderr and
exits with status 2, so users never see a traceback for a mistake of theirs.
"""

from __future__ import annotations

import argparse
import os
import sys

from growfam import __version__
from growfam.errors import GrowfamError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="growfam",
        description="Build Llama model families by progressive training with model expansion.",
    )
    parser.add_argument("--version", action="version", version=f"growfam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # One `_add_<command>(sub)` function per subcommand below; each sets `func` to its handler.
    for add in (_add_info, _add_plan, _add_train, _add_data, _add_family, _add_demo, _add_expand,
                _add_eval, _add_consistency, _add_generate):
        add(sub)
    return parser


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="show the versions and devices growfam sees")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import torch
    import transformers

    print(f"growfam {__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
    print(f"cuda: {torch.cuda.is_available()}  threads: {torch.get_num_threads()}")
    return 0


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="token budgets, steps, FLOPs, LRs and GPU-hours of a family",
                       description="Plan a family under Independent and Progressive training "
                                   "(DESIGN.md section 2).")
    p.add_argument("family", nargs="?", default="paper-r2",
                   help="a shipped family (paper-r1, paper-r2, paper-r2-lr, tiny) or a family YAML "
                        "(default: paper-r2)")
    p.add_argument("--members", nargs="+", metavar="MEMBER",
                   help="replace the family's members: preset names or model config paths")
    p.add_argument("--batch-size", nargs="+", type=int, metavar="SEQS",
                   help="global batch in sequences: one for every stage, or one per stage")
    p.add_argument("--chinchilla", type=float, metavar="R", help="tokens D(N) = R·20·N")
    p.add_argument("--count", choices=("nonembedding", "total", "nominal"),
                   help="which parameter count N is")
    # An H100 SXM's dense bf16 peak; 40% MFU is a typical well-tuned LLM pre-training run.
    p.add_argument("--peak-tflops", type=float, default=989.0, metavar="F",
                   help="peak TFLOP/s of one GPU (default: 989, H100 bf16 dense)")
    p.add_argument("--mfu", type=float, default=0.4, metavar="M",
                   help="model FLOPs utilisation as a fraction (default: 0.4)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_run_plan)


def _run_plan(args) -> int:
    import json

    from growfam.config import load_family_config
    from growfam.family import make_plan
    from growfam.report.tables import format_plan

    changes = {"members": args.members, "chinchilla": args.chinchilla, "count": args.count,
               "batch_size": args.batch_size[0] if args.batch_size and len(args.batch_size) == 1
               else args.batch_size}
    family = load_family_config(args.family).replace(**{k: v for k, v in changes.items() if v is not None})
    plan = make_plan(family)
    if args.json:
        print(json.dumps(plan.to_dict(args.peak_tflops, args.mfu), indent=2))
    else:
        print(format_plan(plan, args.peak_tflops, args.mfu))
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


def _run_train(args) -> int:
    import yaml

    from growfam.errors import ConfigError
    from growfam.io import read_yaml
    from growfam.train import TrainConfig, init_distributed, train

    init_distributed()
    data = read_yaml(args.config)
    if not isinstance(data, dict):
        raise ConfigError(f"{args.config}: a train config must be a mapping")
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            data[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item}: malformed YAML value ({problem})") from None
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
          f"FLOPs {result.flops:.3e} (attention-incl. {result.flops_attn:.3e})  {result.wall_s:.0f} s")
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
                           "BPE on the source (default: gpt2)")
    prep.add_argument("--out", required=True, metavar="DIR", help="dataset directory to create")
    # Numbers stay text here: prepare() checks them (NaN, inf, bounds) with one clear line.
    prep.add_argument("--val-fraction", metavar="F",
                      help="share of documents held out for validation, chosen by hash (default: 0.005)")
    prep.add_argument("--workers", metavar="N", help="tokenising threads (default: all CPUs)")
    prep.add_argument("--max-tokens", metavar="N", help="stop after about N tokens (1e6 is fine)")
    prep.add_argument("--text-field", default="text", help="JSONL/Parquet/HF text field (default: text)")
    prep.add_argument("--force", action="store_true",
                      help="replace OUT if it exists (only once the new dataset is complete)")
    prep.set_defaults(func=_run_data_prepare)


def _run_data_prepare(args) -> int:
    from growfam.data import DEFAULT_TOKENIZER, open_source, prepare

    # prepare() owns the defaults: a flag left out is not passed
    given = {"val_fraction": args.val_fraction} if args.val_fraction is not None else {}
    ds = prepare(open_source(args.source, text_field=args.text_field), DEFAULT_TOKENIZER if args.tokenizer is None else args.tokenizer,
                 args.out, workers=args.workers, max_tokens=args.max_tokens, overwrite=args.force, **given)
    print(f"{ds.path}: train {ds.num_tokens('train'):,} tokens ({ds.num_documents('train'):,} documents), "
          f"val {ds.num_tokens('val'):,} tokens ({ds.num_documents('val'):,} documents), "
          f"vocab {ds.vocab_size:,} ({ds.dtype.name})")
    return 0


def _add_family(sub) -> None:
    p = sub.add_parser("family", help="build a whole family: progressive, independent, or both")
    fam = p.add_subparsers(dest="family_command", metavar="ACTION", required=True)
    run = fam.add_parser("run", help="train every member (resumable: repeat the command to continue)",
                         description="Plan the family, train stage 1, expand, train stage 2, ... "
                                     "Members land in OUT/<mode>/<member>/ as Hugging Face directories; "
                                     "OUT/family.json is the ledger.")
    run.add_argument("family", help="a shipped family name (tiny, paper-r2, ...) or a family YAML")
    run.add_argument("--mode", choices=("progressive", "independent", "both"), default="progressive")
    run.add_argument("--out", default=None, metavar="DIR", help="output directory (default: family/<name>)")
    run.add_argument("--data", metavar="DIR", help="prepared dataset (default: the YAML's data: section)")
    run.add_argument("--fixed-data", action="store_true",
                     help="cap unique tokens at the largest member's from-scratch budget, then repeat them")
    run.add_argument("--eval", action="store_true",
                     help="evaluate each member once it is published (perplexity, zero-shot tasks, as the "
                          "YAML's eval: section says) and the members' consistency at the end")
    run.set_defaults(func=_run_family)
    show = fam.add_parser("show", help="print the comparison table of a family directory")
    show.add_argument("out", metavar="DIR")
    show.set_defaults(func=_run_family_show)


def _modes(mode: str) -> tuple[str, ...]:
    return ("progressive", "independent") if mode == "both" else (mode,)


def _build_family(family: str, out: str | None, data: str | None, modes: tuple[str, ...],
                  fixed_data: bool = False, evaluate: str | None = None) -> int:
    """Plan, check everything, prepare the data if needed, build every member, print the comparison.

    evaluate: None, "eval" (`--eval`: the eval section, refused without lm_eval when it names
    tasks) or "demo" (the same, the zero-shot tasks dropped without lm_eval); then the tables."""
    from pathlib import Path

    from growfam.config import load_family_config
    from growfam.family import check_family, ensure_dataset, run_family
    from growfam.report.tables import format_comparison

    config = load_family_config(family)
    out_dir = Path(out or f"family/{config.name}")
    check_family(config, out_dir, modes, fixed_data)  # before data preparation, which may take long
    evaluator = None
    if evaluate:
        from growfam.eval.run import FamilyEval

        evaluator = FamilyEval(config.eval, out_dir, optional_harness=evaluate == "demo")
    data = ensure_dataset(config, data, out_dir / "data")
    ledger = run_family(config, out_dir, data=data, modes=modes, fixed_data=fixed_data, on_member=evaluator)
    print()
    print(format_comparison(ledger))
    if evaluator is not None:
        from growfam.eval.tables import format_consistency, format_eval

        members, consistency = evaluator.finish()
        for table in ([format_eval(members)] if members else []) + ([format_consistency(consistency)] if consistency else []):
            print()
            print(table)
    return 0


def _run_family(args) -> int:
    return _build_family(args.family, args.out, args.data, _modes(args.mode), args.fixed_data,
                         "eval" if args.eval else None)


def _run_family_show(args) -> int:
    from pathlib import Path

    from growfam.errors import ConfigError
    from growfam.family import read_ledger
    from growfam.report.tables import format_comparison

    ledger = read_ledger(Path(args.out))
    if not ledger:
        raise ConfigError(f"{args.out}: no family.json (not a family directory)")
    print(format_comparison(ledger))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a tiny four-member family both ways on the CPU (~15 min)",
                       description="Prepare the embedded corpus (the Python standard library), then build "
                                   "the `tiny` family progressively and independently, evaluate every member "
                                   "(perplexity, the paper's zero-shot tasks on a few examples when lm_eval is "
                                   "installed) and compare them, consistency included.")
    p.add_argument("--out", default="growfam-demo", metavar="DIR")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    return _build_family("tiny", args.out, None, ("progressive", "independent"), evaluate="demo")



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
                        "concatenates their units (equal depths) (default: depth)")
    p.add_argument("--width", help="width operator (default: aki)")
    p.add_argument("--depth", help="depth operator (default: stack)")
    p.add_argument("--seed", type=int, default=0, help="seed of the index maps and random fills")
    p.add_argument("--probe-tokens", type=int, default=512, metavar="N",
                   help="measure Δlogits and Δloss on N seeded random tokens (0: skip; default 512)")
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


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and the paper's zero-shot tasks of a member or a family",
                       description="Evaluate TARGET, a member directory (any Hugging Face Llama directory) or "
                                   "a family directory (every finished member of every mode): perplexity on "
                                   "the family's validation split, the WikiText-like set (wiki) or a text/JSONL "
                                   "file, and zero-shot tasks through lm-evaluation-harness, offline. A "
                                   "family's results go into its family.json.")
    p.add_argument("target", metavar="TARGET", help="a member directory or a family directory")
    p.add_argument("--tasks", default="paper",
                   help="'paper' (lambada_openai, arc_easy, arc_challenge, winogrande, piqa, openbookqa, "
                        "hellaswag), 'none', or comma-separated task names (default: paper)")
    p.add_argument("--limit", metavar="N", help="score only the first N examples of each task")
    p.add_argument("--ppl", nargs="+", metavar="SOURCE",
                   help="perplexity sources: val (the family's validation split), wiki (BoolQ's Wikipedia "
                        "passages), or .txt/.jsonl/.parquet files or folders; 'none' for no perplexity "
                        "(default: val wiki for a family's members, wiki otherwise)")
    p.add_argument("--ppl-tokens", metavar="N",
                   help="score at most about N tokens of each val / file source (default: 1e6)")
    p.add_argument("--batch-size", metavar="B", help="sequences per forward pass (default: 8)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT ('-': stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import json

    from growfam.eval import EvalOptions, default_ppl, evaluate_target, resolve_target
    from growfam.eval.harness import task_names
    from growfam.eval.tables import format_eval
    from growfam.io import atomic_write_text, check_output

    given = _given(args, limit=1, batch_size=1, ppl_tokens=2)  # EvalOptions owns the defaults
    opts = EvalOptions(tasks=task_names(args.tasks), **given)
    if args.json not in (None, "-"):
        json_path = os.path.abspath(args.json)
        if os.path.isdir(json_path) or not os.path.isdir(os.path.dirname(json_path)):
            raise GrowfamError(f"--json {args.json}: give a file name in an existing folder")
        check_output(args.json, force=args.force, what="--json")
    target = resolve_target(args.target)
    opts.ppl = default_ppl(target) if args.ppl is None else [s for s in dict.fromkeys(args.ppl) if s != "none"]
    if not opts.ppl and not opts.tasks:
        raise GrowfamError("nothing to evaluate: --ppl none and --tasks none")
    members = evaluate_target(target, opts)
    if args.json == "-":
        print(json.dumps({"members": members}, indent=2))
        return 0
    print(format_eval(members))
    if args.json:
        atomic_write_text(args.json, json.dumps({"members": members}, indent=2) + "\n")
    return 0


def _add_consistency(sub) -> None:
    p = sub.add_parser("consistency", help="KL between a family's members (paper Table 4)",
                       description="For each pair of members of each mode, on the same validation windows: "
                                   "KL(P_small||P_large), the reverse, total variation and the expected "
                                   "speculative acceptance sum(min(p, q)); recorded in family.json.")
    p.add_argument("family_dir", metavar="FAMILY_DIR")
    p.add_argument("--pairs", choices=("adjacent", "all"), default="adjacent")
    p.add_argument("--windows", metavar="N", help="validation windows per pair (default: 64)")
    p.add_argument("--batch-size", metavar="B", help="windows per forward pass (default: 8)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_run_consistency)


def _run_consistency(args) -> int:
    import json

    from growfam.eval import family_consistency, resolve_target
    from growfam.eval.tables import format_consistency

    given = _given(args, windows=1, batch_size=1)  # family_consistency owns the defaults
    if not os.path.isfile(os.path.join(args.family_dir, "family.json")):
        raise GrowfamError(f"{args.family_dir}: not a family directory (no family.json)")
    section = family_consistency(resolve_target(args.family_dir), args.pairs, **given)
    print(json.dumps(section, indent=2) if args.json else format_consistency(section))
    return 0


def _given(args, **at_least: int) -> dict:
    """The flags a user gave: `device` as text, each named one as an integer >= its bound; the
    flags left out are not passed, so the called function's defaults apply."""
    from growfam.checks import as_int

    given = {k: as_int(getattr(args, k), "--" + k.replace("_", "-"), at_least=low)
             for k, low in at_least.items() if getattr(args, k) is not None}
    return {**given, **({"device": args.device} if args.device is not None else {})}


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="decode text with a member (KV cache), optionally with a smaller "
                                        "member as the speculative draft",
                       description="Decode a continuation of each prompt with MEMBER_DIR (a Hugging Face "
                                   "Llama directory with its tokenizer), streaming text to stdout. With "
                                   "--draft, speculative sampling: the draft proposes k tokens, the member "
                                   "verifies them in one pass; the output is distributed as the member's "
                                   "own (at temperature 0: identical). Acceptance goes to stderr.")
    p.add_argument("member", metavar="MEMBER_DIR")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="one prompt")
    prompt.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file, one prompt a line")
    p.add_argument("--max-new-tokens", metavar="N", help="tokens per prompt (default: 64)")
    p.add_argument("--temperature", metavar="T", help="0 is greedy (default: 0)")
    p.add_argument("--top-p", metavar="P", help="nucleus sampling mass (default: 1)")
    p.add_argument("--seed", metavar="S", help="sampling seed (default: 0)")
    p.add_argument("--draft", metavar="MEMBER_DIR",
                   help="a smaller member with the same tokenizer files, as the speculative draft")
    p.add_argument("--k", metavar="K", help="tokens the draft proposes a round (default: 8)")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from growfam.data import load_tokenizer
    from growfam.infer import DecodeOptions, check_members, decode_prompts, read_prompts

    given = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "k")
             if getattr(args, k) is not None}  # DecodeOptions owns the defaults
    opts = DecodeOptions(**given).check()
    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    if not all(p.strip() for p in prompts):
        raise GrowfamError("--prompt is empty")
    check_members(args.member, args.draft, 0)  # model directories, same tokenizer files
    tokenizer = load_tokenizer(args.member)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    decode_prompts(args.member, args.draft, tokenizer, prompts, opts, write,
                   lambda line: print(line, file=sys.stderr))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except GrowfamError as err:
        print(f"growfam {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"growfam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
