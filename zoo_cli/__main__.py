"""`python -m zoo_cli ...`: the `zoo` command without the console script (also under torchrun)."""

import sys

from zoo_cli.main import main

if __name__ == "__main__":
    sys.exit(main())
