"""The `train` command as training owns it: its arguments and its run, shared by two entry points.

    python -m training RECIPE [--set k=v ...] [--out DIR] [--resume DIR] [--no-progress]
    torchrun --nproc_per_node=N -m training RECIPE ...      (the exit code tells torchrun whether a rank failed)

`zoo train` (zoo_cli/train.py) adds `add_train_args` to its parser and calls `run_train`, so both take the
same flags and print the same lines; this module knows nothing of zoo_cli (it sits above training).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

MISSING_RECIPE = "train needs a RECIPE or --resume DIR"


def add_train_args(p: argparse.ArgumentParser) -> None:
    """RECIPE, --set, --out, --resume, --no-progress on a (sub-)parser."""
    p.add_argument("recipe", nargs="?", help="recipe YAML, e.g. training/recipes/simclr/fmnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--out", help="run folder (default runs/<method>-<dataset>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Train (or resume) as `args` say; 130 after Ctrl-C / SIGTERM with a one-line hint, else 0."""
    # Imported here: `zoo --help` and the other commands need not load the trainer.
    from training.recipe import load_recipe
    from training.trainer import train
    from zoo.checkpoint import CHECKPOINT_FILE

    if not (args.recipe or args.resume):
        parser.error(MISSING_RECIPE)  # argparse's usage line and exit status 2
    if args.resume:
        out = Path(args.resume)
        recipe = load_recipe(out / "recipe.yaml", args.set)
    else:
        recipe = load_recipe(args.recipe, args.set)
        out = Path(args.out or f"runs/{recipe['method']['name']}-{recipe['data']['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        final = train(recipe, out, resume=bool(args.resume), progress=not args.no_progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: checkpoints are written atomically, so the last one is intact
        if (out / CHECKPOINT_FILE).exists():
            print(f"\ninterrupted: {out} keeps its last checkpoint; continue with `zoo train --resume {out}`",
                  file=sys.stderr)
        else:
            print("\ninterrupted before the first checkpoint: nothing to resume; start the run again", file=sys.stderr)
        return 130
    print(f"run {out}: step {final['step']}, epoch {final['epoch']}, k-NN top-1 {final['knn_top1']:.2f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m training`: the trainer alone, with `zoo`'s one-line errors and exit codes."""
    from zoo.errors import ONE_LINE_ERRORS

    parser = argparse.ArgumentParser(prog="python -m training", description="Train a recipe (one process, or one "
                                     "rank under torchrun).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; errors with their traceback")
    add_train_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return run_train(args, parser)
    except ONE_LINE_ERRORS as e:
        if args.verbose:
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
