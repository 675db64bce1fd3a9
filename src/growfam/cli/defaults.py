"""Defaults in `--help` read from the code that owns them, never written twice.

A flag's help says `default("growfam.config:EvalConfig.batch_size")`; the help formatter turns
it into "(default: 8)" when the help is printed, importing the owner only then (a dataclass
field, a function's parameter or a module constant), so `growfam --help` stays fast and a
changed default shows in the help at once. The commands themselves pass on only the flags a
user gave, so the owner's default is also the one that applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re

_MARK = re.compile(r"\{default:([\w.]+):([\w.]+)\}")


def default(owner: str) -> str:
    """The placeholder of the default of `owner`, "module:Name.attribute" or "module:NAME"."""
    module, _, path = owner.partition(":")
    if not module or not path:
        raise ValueError(f"default({owner!r}): give module:Name.attribute")
    return "{default:" + owner + "}"


def value_of(module: str, path: str):
    """The default `module:path` names: a dataclass field's default (or default_factory's value),
    a function's parameter default, or a module constant."""
    obj = importlib.import_module(module)
    *outer, name = path.split(".")
    for part in outer:
        obj = getattr(obj, part)
    if dataclasses.is_dataclass(obj):
        found = {f.name: f for f in dataclasses.fields(obj)}[name]
        return found.default_factory() if found.default is dataclasses.MISSING else found.default
    if callable(obj) and outer:
        return inspect.signature(obj).parameters[name].default
    return getattr(obj, name)


def shown(value) -> str:
    """A default as a user types it: 1e6, 0.005, "0 1" for a list."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:g}".replace("e+0", "e").replace("e+", "e")


class DefaultsFormatter(argparse.HelpFormatter):
    """Fills each `default(...)` placeholder of a help string with "(default: VALUE)"."""

    def _get_help_string(self, action):
        return _MARK.sub(lambda m: f"(default: {shown(value_of(m[1], m[2]))})", super()._get_help_string(action))


def use_defaults_formatter(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every subcommand parser under it the DefaultsFormatter."""
    parser.formatter_class = DefaultsFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                use_defaults_formatter(child)
