"""`python -m autoround_fast ...`: the command line (cli/), as the `autoround-fast` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
