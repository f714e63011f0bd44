"""The `zoo` command. Sub-commands import their heavy parts lazily (training, export, faiss)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from zoo.registry import list_models, registry

    for name in list_models(args.pattern, pretrained_only=args.pretrained):
        spec = registry()[name]
        knn = spec.metrics.get("knn_k20")
        print(f"{name:40s} {'weights' if spec.has_weights else '-':8s} "
              f"{'' if knn is None else f'k-NN {knn:.1f}'}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from zoo.report import table

    print(table(args.tag, markdown=args.markdown))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from zoo.registry import get_spec

    print(json.dumps(get_spec(args.name).to_dict(), indent=2))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from training.recipe import load_recipe
    from training.trainer import CHECKPOINT, train

    if args.resume:
        out = Path(args.resume)
        recipe = load_recipe(out / "recipe.yaml", args.set)
    else:
        recipe = load_recipe(args.recipe, args.set)
        out = Path(args.out or f"runs/{recipe['method']['name']}-{recipe['data']['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        final = train(recipe, out, resume=bool(args.resume), progress=not args.no_progress)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: checkpoints are written atomically, so the last one is intact
        if (out / CHECKPOINT).exists():
            print(f"\ninterrupted: {out} keeps its last checkpoint; continue with `zoo train --resume {out}`",
                  file=sys.stderr)
        else:
            print("\ninterrupted before the first checkpoint: nothing to resume; start the run again", file=sys.stderr)
        return 130
    print(f"run {out}: step {final['step']}, epoch {final['epoch']}, k-NN top-1 {final['knn_top1']:.2f}")
    return 0


def _cmd_bench_train(args: argparse.Namespace) -> int:
    from training.bench import bench_train

    bench_train(args.methods or None, steps=args.steps, batch_size=args.batch_size, dataset=args.dataset, bf16=args.bf16)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from zoo.demo import run_demo

    return run_demo(args.model, n_queries=args.queries, grid_path=args.grid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoo", description="ssl-zoo: self-supervised backbones, embeddings, "
                                     "nearest-neighbour search, training recipes and export.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="list registry models")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="only models with weights")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("report", help="results table of the shipped models of a dataset tag beside its baselines")
    p.add_argument("tag", nargs="?", default="fmnist")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("info", help="print a model's registry row")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("train", help="train a recipe (torchrun -m training ... for several processes)")
    p.add_argument("recipe", nargs="?", help="recipe YAML, e.g. training/recipes/simclr/fmnist.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    p.add_argument("--out", help="run folder (default runs/<method>-<dataset>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR exactly where it stopped")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_train)

    from zoo.commands import register as register_embedding_commands

    bench_sub = register_embedding_commands(sub)  # embed, index, search, eval, bench {embed, index}
    p = bench_sub.add_parser("train", help="per method at its Fashion-MNIST recipe: img/s, augment and loss shares")
    p.add_argument("methods", nargs="*", help="default: all methods")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dataset", default=None, help="e.g. synthetic (tiny smoke runs)")
    p.add_argument("--bf16", action="store_true",
                   help="also time each step under bf16 autocast + channels-last and print the speed-up over the recipe")
    p.set_defaults(func=_cmd_bench_train)

    from export.cli import register as register_export

    register_export(sub)

    from zoo.convert import register as register_convert

    register_convert(sub)  # convert CHECKPOINT --from FORMAT --arch ARCH --out DIR

    p = sub.add_parser("demo", help="the main job: load a shipped model, embed Fashion-MNIST, search, report")
    p.add_argument("--model", default=None, help="model name (default: the best shipped Fashion-MNIST model)")
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--grid", default="zoo-demo-retrieval.png", help="where to write the retrieval picture (PNG)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader reports every SIMD variant it tries
    if args.command == "train" and not (args.recipe or args.resume):
        build_parser().error("train needs a RECIPE or --resume DIR")
    from zoo.errors import ZooError

    try:
        return int(args.func(args) or 0)
    except (ZooError, FileNotFoundError, ValueError, KeyError) as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
