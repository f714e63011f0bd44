"""`zoo train` (the trainer, with training's own arguments) and `zoo transfer detect` (detection fine-tuning).

`zoo train` is `python -m training` under another name: both take `training.run.add_train_args` and run
`training.run.run_train`, so the flags and messages cannot drift apart.
"""

from __future__ import annotations

import argparse
from typing import Any

from training.run import add_train_args, run_train


def _cmd_transfer_detect(args: argparse.Namespace) -> int:
    from training.detection import run_detection

    final = run_detection(args.recipe, overrides=args.set, out=args.out, progress=not args.no_progress)
    print(f"run {final['out']}: {final['steps']} steps, last loss {final['loss']:.4f}"
          + "".join(f", {k} {v:.2f}" for k, v in (final.get("metrics") or {}).items()))
    return 0


def register(subparsers: Any) -> None:
    """Add `train` to `zoo`'s sub-parsers."""
    p = subparsers.add_parser("train", help="train a recipe (torchrun -m training ... for several processes)")
    add_train_args(p)
    p.set_defaults(func=lambda args: run_train(args, p))


def register_transfer(subparsers: Any) -> None:
    """Add `transfer detect RECIPE`: the detection transfer runner (training/detection.py)."""
    p = subparsers.add_parser("transfer", help="downstream transfer runs (detection)")
    tsub = p.add_subparsers(dest="transfer_command", required=True)
    d = tsub.add_parser("detect", help="fine-tune a detector on a zoo backbone from a recipe "
                                       "(training/recipes/detection/*.yaml)")
    d.add_argument("recipe", help="e.g. training/recipes/detection/voc-faster-rcnn.yaml")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. data.root=/data/VOCdevkit or model.name=wmse-resnet50.in1k")
    d.add_argument("--out", default=None, help="run folder (default runs/detect-<recipe>-<time>)")
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=_cmd_transfer_detect)
