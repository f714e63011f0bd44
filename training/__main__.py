"""`torchrun --nproc_per_node=N -m training RECIPE [--set k=v ...] [--out DIR] [--resume DIR]`."""

from zoo.cli import main

if __name__ == "__main__":
    import sys

    sys.exit(main(["train", *sys.argv[1:]]))  # the exit code tells torchrun whether the rank failed
