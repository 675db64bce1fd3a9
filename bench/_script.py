"""What every bench script does at its entry point: run main(), and turn a GrowfamError (bad
input: a missing family, a corrupt model, a shape that does not fit) into one line on stderr
and exit status 2, as the growfam command does."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from growfam.errors import GrowfamError


def run(main: Callable[[], int | None]) -> None:
    """sys.exit(main()), a GrowfamError as one line naming the script and exit status 2."""
    try:
        sys.exit(main())
    except GrowfamError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
