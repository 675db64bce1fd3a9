"""`growfam` command line: one parser, one subcommand per job.

Every handler raises GrowfamError for bad input; `main` prints it as one line on stderr and
exits with status 2, so users never see a traceback for a mistake of theirs.
"""

from __future__ import annotations

import argparse
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
    for add in (_add_info,):
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except GrowfamError as err:
        print(f"growfam {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"growfam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
