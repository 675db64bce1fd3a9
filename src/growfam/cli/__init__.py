"""`growfam` command line: one parser, one subcommand per job.

building.py holds the commands that build a family (info, plan, data, train, family, demo,
report), expand.py `growfam expand` (growing saved models), shrink.py `growfam shrink` (pruning
them), members.py the commands that use a family's members (eval, consistency, generate,
speculate); defaults.py fills the defaults their help shows.
Every handler raises GrowfamError for bad input; `main` prints it as one line on stderr and
exits with status 2 (3 for a diverged run), so users never see a traceback for a mistake of
theirs.
cli/ may import every package; nothing imports it.
"""

from __future__ import annotations

import argparse
import os
import sys

from growfam import __version__
from growfam.cli.building import _add_data, _add_demo, _add_family, _add_info, _add_plan, _add_report, _add_train
from growfam.cli.defaults import use_defaults_formatter
from growfam.cli.expand import _add_expand
from growfam.cli.members import _add_consistency, _add_eval, _add_generate, _add_speculate
from growfam.cli.posttrain import _add_posttrain
from growfam.cli.shrink import _add_shrink
from growfam.errors import GrowfamError


#: The commands that run under torchrun, every rank taking part; every other command runs in one
#: process and refuses a world of several (it would do its work, and write its results, once per rank).
DISTRIBUTED = ("train", "family", "posttrain", "shrink")


def _check_world(command: str) -> None:
    world = os.environ.get("WORLD_SIZE", "1")
    if command not in DISTRIBUTED and world.strip() not in ("", "0", "1"):
        raise GrowfamError(f"{command} runs in one process; start it without torchrun (WORLD_SIZE={world}): "
                           f"only {', '.join(DISTRIBUTED)} run on several")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="growfam",
        description="Build Llama model families by progressive training with model expansion.",
    )
    parser.add_argument("--version", action="version", version=f"growfam {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # One `_add_<command>(sub)` per subcommand (building.py, members.py); each sets `func` to its handler.
    for add in (_add_info, _add_plan, _add_train, _add_data, _add_family, _add_demo, _add_expand, _add_shrink,
                _add_eval, _add_consistency, _add_generate, _add_speculate, _add_posttrain, _add_report):
        add(sub)
    use_defaults_formatter(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    succeeded = False
    try:
        _check_world(args.command)
        status = args.func(args) or 0
        succeeded = True
        return status
    except GrowfamError as err:
        print(f"growfam {args.command}: error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"growfam {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "growfam.train.parallel" in sys.modules:  # the process group is left at exit, by its outcome
            from growfam.train.parallel import record_outcome

            record_outcome(succeeded)
