"""The one exception type users see, and file readers that raise it instead of tracebacks.

The CLI turns any `GrowfamError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml


class GrowfamError(Exception):
    """A user-facing error: bad input, a bad request, a file that cannot be used."""


class ConfigError(GrowfamError, ValueError):
    """A configuration that cannot describe a valid model, plan or run."""


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
