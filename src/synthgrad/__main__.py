"""`python -m synthgrad`: the same as the `synthgrad` command."""

import sys

from synthgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
