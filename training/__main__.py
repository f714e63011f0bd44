"""`torchrun --nproc_per_node=N -m training RECIPE [--set k=v ...] [--out DIR] [--resume DIR]`."""

import sys

from training.run import main

if __name__ == "__main__":
    sys.exit(main())  # the exit code tells torchrun whether the rank failed
