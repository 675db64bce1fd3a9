"""The exception types users see (exception types only: validators live in checks.py, file
readers in io.py).

The CLI turns any `GrowfamError` into one line on stderr and exit status 2 (or the error's
`exit_code`: 3 for `TrainingDiverged`).
"""

from __future__ import annotations


class GrowfamError(Exception):
    """A user-facing error: bad input, a bad request, a file that cannot be used."""


class ConfigError(GrowfamError, ValueError):
    """A configuration that cannot describe a valid model, plan or run."""


class TrainingDiverged(GrowfamError):
    """Training stopped because it kept diverging (bounded rollbacks exhausted, or NaN/inf
    weights with no checkpoint to go back to); the last good checkpoint is kept.
    The CLI exits with `exit_code` so scripts can tell it from bad input."""

    exit_code = 3
