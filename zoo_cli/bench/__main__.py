"""`python -m zoo_cli.bench embed|index|train ...`: the same as `zoo bench ...`."""

import sys

from zoo_cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
