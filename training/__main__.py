"""`torchrun --nproc_per_node=N -m training RECIPE [--set k=v ...] [--out DIR] [--resume DIR]`."""

from zoo.cli import main

if __name__ == "__main__":
    import sys

    main(["train", *sys.argv[1:]])
