"""`zoo`: the parser assembled from the command groups, dispatch, and one-line errors.

Each group module adds its sub-commands with `register(subparsers)`; the order below is the order of
`zoo --help`. A user error (`zoo.errors.ONE_LINE_ERRORS`) prints one `zoo: error: ...` line on stderr
and exits with status 2, argparse's status for bad arguments; `-v` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from zoo_cli import bench, convert, embed, evaluate, export, models, train

PROG = "zoo"


def build_parser() -> argparse.ArgumentParser:
    """The whole `zoo` parser (sub-parsers carry their handler as `func`)."""
    parser = argparse.ArgumentParser(prog=PROG, description="ssl-zoo: self-supervised backbones, embeddings, "
                                     "nearest-neighbour search, training recipes and export.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    models.register(sub)  # list, report, info
    train.register(sub)  # train
    embed.register(sub)  # embed, index build, search
    evaluate.register(sub)  # eval knn | linear | finetune
    train.register_transfer(sub)  # transfer detect
    bench.register(sub)  # bench embed | index | train
    export.register(sub)  # export, publish
    convert.register(sub)  # convert
    models.register_demo(sub)  # demo
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `zoo ARGV` and return its exit status (0 ok, 2 user error, 130 interrupted training)."""
    from zoo.errors import ONE_LINE_ERRORS

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every SIMD variant it tries
    try:
        return int(args.func(args) or 0)
    except ONE_LINE_ERRORS as e:
        if args.verbose:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
