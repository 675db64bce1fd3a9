"""`python -m growfam`: the same as the `growfam` command (and `torchrun ... -m growfam ...`)."""

import sys

from growfam.cli import main

if __name__ == "__main__":
    sys.exit(main())
