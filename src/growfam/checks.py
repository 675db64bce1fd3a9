"""Validators of user input that raise ConfigError (one clear line, naming what is wrong).

They sit below every config dataclass, so model/, train/ and config.py can all use them without
importing each other. Imports only growfam.errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from typing import Any, ClassVar

from growfam.errors import ConfigError


def as_number(value: Any, what: str, *, above: float | None = None, at_least: float | None = None,
              at_most: float | None = None) -> float:
    """`value` as a finite float within the given bounds; ConfigError naming `what` otherwise.

    Text that parses as a number is accepted: YAML 1.1 reads `3e-4` and `40e9` (no dot) as
    strings.
    """
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if above is not None and value <= above:
        raise ConfigError(f"{what} must be {'positive' if above == 0 else f'> {above}'}, got {value!r}")
    if (at_least is not None and value < at_least) or (at_most is not None and value > at_most):
        bounds = f"in [{at_least}, {at_most}]" if at_most is not None else f">= {at_least}"
        raise ConfigError(f"{what} must be {bounds}, got {value}")
    return float(value)


def as_int(value: Any, what: str, at_least: int = 0) -> int:
    """`value` as a whole number >= at_least; ConfigError naming `what` otherwise.

    Whole floats and numeric text are accepted: users write `1e6` for integers, and YAML 1.1
    reads it as a string.
    """
    number = as_number(value, what) if not isinstance(value, int) or isinstance(value, bool) else value
    if not float(number).is_integer() or number < at_least:
        raise ConfigError(f"{what} must be an integer >= {at_least}, got {value!r}")
    return int(number)


def check_keys(data: dict, known: Iterable[str], where: str) -> None:
    """ConfigError for the first key of `data` that is not in `known`, with a did-you-mean hint."""
    known = list(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(known)}")


def shown(value: Any) -> str:
    """A value for an error message: a scalar as written, a container by its type (it may be long)."""
    return repr(value) if isinstance(value, (str, int, float, type(None))) else type(value).__name__


def as_mapping(value: Any, what: str) -> dict:
    """`value` if it is a mapping; ConfigError naming `what` otherwise."""
    if not isinstance(value, dict):
        raise ConfigError(f"{what} must be a mapping, got {shown(value)}")
    return value


def as_choice(value: Any, choices: Iterable[str], what: str) -> Any:
    """`value` if it is one of `choices`; ConfigError listing them otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{what} must be {' or '.join(choices)}, got {value!r}")
    return value


def per_stage(value: Any, n: int, what: str, convert) -> list:
    """A scalar broadcast to each of n stages, or a list with exactly one entry per stage, each
    passed through convert(entry, name)."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"{what} has {len(value)} entries for {n} members")
        return [convert(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return [convert(value, what)] * n


class Section:
    """A YAML section as a dataclass named `key`: unknown keys are errors, None means defaults."""

    key: ClassVar[str]

    @classmethod
    def from_dict(cls, data: Any):
        data = {} if data is None else as_mapping(data, cls.key)
        check_keys(data, [f.name for f in dataclasses.fields(cls)], cls.key)
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
