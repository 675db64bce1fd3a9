"""The command line's help: every default it shows is read from the code that applies it."""

import re
from pathlib import Path

import pytest

import growfam.cli
from growfam.cli import build_parser
from growfam.cli.defaults import default, shown, value_of
from growfam.config import EvalConfig
from growfam.infer.speculate import SpeculateOptions

COMMANDS = [["plan"], ["train"], ["data", "prepare"], ["family", "run"], ["family", "show"], ["demo"], ["expand"],
            ["eval"], ["consistency"], ["generate"], ["speculate"], ["posttrain"], ["report"], ["info"]]


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())  # lines joined: a default may wrap


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_help_renders_its_defaults(argv, capsys):
    text = _help(argv, capsys)
    assert "{default:" not in text and "Traceback" not in text


def test_the_help_shows_the_defaults_the_commands_apply(capsys):
    assert value_of("growfam.config", "EvalConfig.batch_size") == EvalConfig().batch_size == 8
    assert value_of("growfam.infer.speculate", "SpeculateOptions.temperatures") == SpeculateOptions().temperatures
    assert f"windows per pair (default: {EvalConfig().windows})" in _help(["consistency"], capsys)
    assert f"temperatures, 0 = greedy (default: {shown(SpeculateOptions().temperatures)})" in _help(["speculate"], capsys)
    assert "(default: 1e6)" in _help(["eval"], capsys) and shown(0.005) == "0.005"


def test_a_changed_default_shows_in_the_help(monkeypatch, capsys):
    monkeypatch.setattr("growfam.family.plan.DEFAULT_MFU", 0.55)
    assert "model FLOPs utilisation as a fraction (default: 0.55)" in _help(["plan"], capsys)


def test_no_help_string_writes_a_default_by_hand():
    """A number or a bare name after "(default:" in the CLI's source would be a second copy of a
    default; words ("all CPUs", "the YAML's data: section") say what happens instead, and
    argparse's own %(default)s shows a default the parser itself sets."""
    folder = Path(growfam.cli.__file__).parent
    commands = [path for path in folder.glob("*.py") if path.name != "defaults.py"]  # defaults.py: the mechanism
    written = [m for path in commands for m in re.findall(r"\(default: ([^)]*)\)", path.read_text())]
    by_hand = [w for w in written if re.fullmatch(r"[\d.e+-]+( [\d.e+-]+)*|[A-Za-z_][\w-]*", w)]
    assert len(written) > 5 and by_hand == []
    with pytest.raises(ValueError):
        default("EvalConfig.batch_size")  # no module: the help could not find it
