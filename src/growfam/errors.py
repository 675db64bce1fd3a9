"""The one exception type users see, and file readers that raise it instead of tracebacks.

The CLI turns any `GrowfamError` into one line on stderr and exit status 2 (or the error's
`exit_code`: 3 for `TrainingDiverged`).
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


class GrowfamError(Exception):
    """A user-facing error: bad input, a bad request, a file that cannot be used."""


class ConfigError(GrowfamError, ValueError):
    """A configuration that cannot describe a valid model, plan or run."""


class TrainingDiverged(GrowfamError):
    """Training stopped because it kept diverging (bounded rollbacks exhausted, or NaN/inf
    weights with no checkpoint to go back to); the last good checkpoint is kept.
    The CLI exits with `exit_code` so scripts can tell it from bad input."""

    exit_code = 3


def read_yaml(path: str | Path):
    """Parse a YAML (or JSON, a YAML subset) file; ConfigError on a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None


def read_json(path: str | Path):
    """Parse a JSON file; ConfigError on a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: malformed JSON: {err}") from None


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


def check_keys(data: dict, known: Iterable[str], where: str) -> None:
    """ConfigError for the first key of `data` that is not in `known`, with a did-you-mean hint."""
    known = list(known)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r} in {where}{hint}; known keys: {', '.join(known)}")


def as_int(value: Any, what: str, at_least: int = 0) -> int:
    """`value` as a whole number >= at_least; ConfigError naming `what` otherwise.

    Whole floats and numeric text are accepted: users write `1e6` for integers, and YAML 1.1
    reads it as a string.
    """
    number = as_number(value, what) if not isinstance(value, int) or isinstance(value, bool) else value
    if not float(number).is_integer() or number < at_least:
        raise ConfigError(f"{what} must be an integer >= {at_least}, got {value!r}")
    return int(number)
