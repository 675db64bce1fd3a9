"""The commands that use built members: eval, consistency, generate, speculate.

Each `_add_<command>(sub)` adds one subparser and sets its handler; handlers pass on only the
flags a user gave, so the stage package's defaults are the only ones.
"""

from __future__ import annotations

import os
import sys

from growfam.cli.defaults import default
from growfam.errors import GrowfamError


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and the paper's zero-shot tasks of a member or a family",
                       description="Evaluate TARGET, a member directory (any Hugging Face Llama directory) or "
                                   "a family directory (every finished member of every mode): perplexity on "
                                   "the family's validation split, the WikiText-like set (wiki) or a text/JSONL "
                                   "file, and zero-shot tasks through lm-evaluation-harness, offline. A "
                                   "family's results go into its family.json.")
    p.add_argument("target", metavar="TARGET", help="a member directory or a family directory")
    p.add_argument("--tasks",
                   help="'paper' (lambada_openai, arc_easy, arc_challenge, winogrande, piqa, openbookqa, "
                        f"hellaswag), 'none', or comma-separated task names {default('growfam.config:EvalConfig.tasks')}")
    p.add_argument("--limit", metavar="N", help="score only the first N examples of each task")
    p.add_argument("--ppl", nargs="+", metavar="SOURCE",
                   help="perplexity sources: val (the family's validation split), wiki (BoolQ's Wikipedia "
                        "passages), or .txt/.jsonl/.parquet files or folders; 'none' for no perplexity "
                        "(default: val wiki for a family's members, wiki otherwise)")
    p.add_argument("--ppl-tokens", metavar="N",
                   help=f"score at most about N tokens of each val / file source {default('growfam.config:EvalConfig.ppl_tokens')}")
    p.add_argument("--batch-size", metavar="B",
                   help=f"sequences per forward pass {default('growfam.config:EvalConfig.batch_size')}")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... {default('growfam.config:EvalConfig.device')}")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT ('-': stdout)")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    import json

    from growfam.config import EvalConfig
    from growfam.eval import evaluate_target
    from growfam.family.members import resolve_target
    from growfam.eval.harness import task_names
    from growfam.eval.tables import format_eval
    from growfam.io import atomic_write_text, check_output
    from growfam.outputs import FILE

    given = _given(args, limit=1, batch_size=1, ppl_tokens=2)  # EvalConfig owns the defaults
    tasks = {"tasks": task_names(args.tasks)} if args.tasks is not None else {}  # checked now: before any write
    opts = EvalConfig(ppl=args.ppl, **tasks, **given)
    if args.json not in (None, "-"):
        json_path = os.path.abspath(args.json)
        if os.path.isdir(json_path) or not os.path.isdir(os.path.dirname(json_path)):
            raise GrowfamError(f"--json {args.json}: give a file name in an existing folder")
        check_output(args.json, force=args.force, makes=FILE, what="--json")
    members = evaluate_target(resolve_target(args.target), opts)
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
    p.add_argument("--pairs", choices=("adjacent", "all"),
                   help=f"each member with the next larger one, or every pair {default('growfam.config:EvalConfig.pairs')}")
    p.add_argument("--windows", metavar="N",
                   help=f"validation windows per pair {default('growfam.config:EvalConfig.windows')}")
    p.add_argument("--batch-size", metavar="B",
                   help=f"windows per forward pass {default('growfam.config:EvalConfig.batch_size')}")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... {default('growfam.config:EvalConfig.device')}")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_run_consistency)


def _run_consistency(args) -> int:
    import json

    from growfam.eval import family_consistency
    from growfam.eval.tables import format_consistency

    given = _given(args, windows=1, batch_size=1)  # family_consistency owns the defaults
    pairs = {"pairs": args.pairs} if args.pairs is not None else {}
    section = family_consistency(_family(args.family_dir), **pairs, **given)
    print(json.dumps(section, indent=2) if args.json else format_consistency(section))
    return 0


def _family(path: str):
    """The family directory `path` as an eval Target; GrowfamError for a member directory or
    anything else without family.json."""
    from growfam.family import LEDGER, FamilyDirectory
    from growfam.family.members import resolve_target

    if not FamilyDirectory(path).ledger.is_file():
        raise GrowfamError(f"{path}: not a family directory (no {LEDGER})")
    return resolve_target(path)


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
    p.add_argument("--max-new-tokens", metavar="N", help=f"tokens per prompt {default('growfam.infer.run:DecodeOptions.max_new_tokens')}")
    p.add_argument("--temperature", metavar="T", help=f"0 is greedy {default('growfam.infer.run:DecodeOptions.temperature')}")
    p.add_argument("--top-p", metavar="P", help=f"nucleus sampling mass {default('growfam.infer.run:DecodeOptions.top_p')}")
    p.add_argument("--seed", metavar="S", help=f"sampling seed {default('growfam.infer.run:DecodeOptions.seed')}")
    p.add_argument("--draft", metavar="MEMBER_DIR",
                   help="a smaller member with the same tokenizer files, as the speculative draft")
    p.add_argument("--k", metavar="K", help=f"tokens the draft proposes a round {default('growfam.infer.run:DecodeOptions.k')}")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... {default('growfam.infer.run:DecodeOptions.device')}")
    p.add_argument("--dtype", help=f"float32, bfloat16 or float16 {default('growfam.infer.run:DecodeOptions.dtype')}")
    p.set_defaults(func=_run_generate)


def _run_generate(args) -> int:
    from growfam.data import load_tokenizer
    from growfam.infer import DecodeOptions, decode_prompts, read_prompts

    given = {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "seed", "k", "device", "dtype")
             if getattr(args, k) is not None}  # DecodeOptions owns the defaults
    opts = DecodeOptions(**given)  # checked by decode_prompts
    prompts = [args.prompt] if args.prompts is None else read_prompts(args.prompts)
    if not all(p.strip() for p in prompts):
        raise GrowfamError("--prompt is empty")
    # the tokenizer first (decode_prompts checks the members against it): named as what is missing
    if not os.path.isdir(args.member):
        raise GrowfamError(f"{args.member}: not a directory")
    if not os.path.isfile(os.path.join(args.member, "tokenizer.json")):
        raise GrowfamError(f"{args.member}: no tokenizer.json (generate needs the member's tokenizer)")
    tokenizer = load_tokenizer(args.member)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    decode_prompts(args.member, args.draft, tokenizer, prompts, opts, write,
                   lambda line: print(line, file=sys.stderr))
    return 0


def _add_speculate(sub) -> None:
    p = sub.add_parser("speculate", help="speculative decoding with smaller members as drafts (paper Table 5)",
                       description="For each target member and each smaller draft, in the four combinations "
                                   "of modes (prog->prog, ind->prog, ind->ind, prog->ind): speculative "
                                   "decoding of N prompts cut from the family's validation split against the "
                                   "target decoding alone; acceptance, tokens per target call, tokens/s, "
                                   "speed-up and the expected acceptance sum(min(p, q)). Recorded in "
                                   "family.json.")
    p.add_argument("family_dir", metavar="FAMILY_DIR")
    p.add_argument("--pairs", choices=("adjacent", "all"),
                   help=f"drafts for each target: the next smaller member, or every smaller one {default('growfam.infer.speculate:SpeculateOptions.pairs')}")
    p.add_argument("--prompts", metavar="N", help=f"prompts cut from the validation split {default('growfam.infer.speculate:SpeculateOptions.prompts')}")
    p.add_argument("--prompt-tokens", metavar="T", help=f"tokens per prompt {default('growfam.infer.speculate:SpeculateOptions.prompt_tokens')}")
    p.add_argument("--max-new-tokens", metavar="N", help=f"tokens decoded per prompt {default('growfam.infer.speculate:SpeculateOptions.max_new_tokens')}")
    p.add_argument("--k", metavar="K", help=f"tokens the draft proposes a round {default('growfam.infer.speculate:SpeculateOptions.k')}")
    p.add_argument("--temperature", nargs="+", metavar="T", help=f"temperatures, 0 = greedy {default('growfam.infer.speculate:SpeculateOptions.temperatures')}")
    p.add_argument("--seed", metavar="S", help=f"sampling seed {default('growfam.infer.speculate:SpeculateOptions.seed')}")
    p.add_argument("--device", help=f"auto, cpu, cuda, cuda:1, ... {default('growfam.infer.speculate:SpeculateOptions.device')}")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_run_speculate)


def _run_speculate(args) -> int:
    import json

    from growfam.infer.speculate import SpeculateOptions, family_speculative, format_speculative

    given = {k: getattr(args, k) for k in ("pairs", "prompts", "prompt_tokens", "max_new_tokens", "k", "seed", "device")
             if getattr(args, k) is not None}  # SpeculateOptions owns the defaults
    if args.temperature is not None:
        given["temperatures"] = args.temperature
    opts = SpeculateOptions(**given)
    section = family_speculative(_family(args.family_dir), opts)
    print(json.dumps(section, indent=2) if args.json else format_speculative(section))
    return 0
