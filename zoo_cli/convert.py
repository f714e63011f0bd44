"""`zoo convert CHECKPOINT --from FORMAT --arch ARCH --out DIR`: another project's checkpoint -> zoo's folder.

The conversion itself is the library's: formats in `zoo.convert_formats`, key rules and checks in `zoo.convert`.
"""

from __future__ import annotations

import argparse
from typing import Any

from zoo.convert import convert
from zoo.convert_formats import FORMATS


def _cmd_convert(args: argparse.Namespace) -> int:
    convert(args.checkpoint, args.from_format, args.arch, args.out, name=args.name, drop=args.drop, strip=args.strip,
            keep=args.keep, input_size=args.input_size, resize_size=args.resize_size, mean=args.mean, std=args.std,
            interpolation=args.interpolation, force=args.force)
    return 0


def register(subparsers: Any) -> None:
    """Add `zoo convert` to `zoo`'s sub-parsers."""
    rows = "\n".join(f"  {f.name:12s} {f.description}\n  {'':12s} keeps {f.encoder}" for f in FORMATS.values())
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint of another project's code into a folder zoo.load / zoo export take",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read CHECKPOINT (torch.load weights_only=True, or safetensors) in the layout its own code "
                    "writes, keep the backbone, check every key and the features, and write OUT/model.safetensors "
                    "+ config.json (+ checkpoint.pt for `zoo export` with --name).\n\nformats:\n" + rows)
    p.add_argument("checkpoint", help="the file the other code saved (.pth, .pt, .ckpt, .bin, .safetensors)")
    p.add_argument("--from", dest="from_format", required=True, choices=list(FORMATS), metavar="FORMAT",
                   help=f"checkpoint layout: {', '.join(FORMATS)}")
    p.add_argument("--arch", default=None, help="ssl-zoo arch it was trained with (zoo.ARCHS), e.g. resnet50")
    p.add_argument("--out", required=True, help="output folder (pretrained= for zoo.load; CHECKPOINT for zoo export)")
    p.add_argument("--name", default=None, help="full registry name the weights are for, e.g. groco-resnet50.in1k: "
                                                "sets the arch, writes its config.json row and checkpoint.pt")
    p.add_argument("--drop", action="append", default=[], metavar="PREFIX",
                   help="also drop keys starting with PREFIX (a part the format's row does not know); repeatable")
    p.add_argument("--strip", action="append", default=[], metavar="PREFIX",
                   help="remove PREFIX from the keys that start with it (after module. / _orig_mod. / model. "
                        "wrapper levels, which are removed by themselves); repeatable")
    p.add_argument("--keep", default=None, metavar="PREFIX",
                   help="keep only the keys under PREFIX and read them as the format's backbone, e.g. "
                        "--keep student_backbone. (lightly DINO: the teacher is kept by default)")
    pre = p.add_argument_group("preprocessing recorded in config.json (default: --name's registry row, else the "
                               "format's (timm, torchvision), else the dataset of --arch)")
    pre.add_argument("--input-size", type=int, default=None, help="centre-crop size in pixels")
    pre.add_argument("--resize-size", type=int, default=None,
                     help="shorter side before the crop (default: keeps the default crop ratio)")
    pre.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    pre.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"))
    pre.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], default=None)
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=_cmd_convert)
