"""`python -m growfam.cli`: the same as the `growfam` command."""

import sys

from growfam.cli import main

if __name__ == "__main__":
    sys.exit(main())
