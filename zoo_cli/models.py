"""`zoo list`, `zoo info`, `zoo report`, `zoo demo`: what the registry holds and the main job in one command."""

from __future__ import annotations

import argparse
from typing import Any


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


def _cmd_demo(args: argparse.Namespace) -> int:
    from zoo.demo import run_demo

    return run_demo(args.model, n_queries=args.queries, grid_path=args.grid)


def register(subparsers: Any) -> None:
    """Add `list`, `report` and `info` to `zoo`'s sub-parsers."""
    p = subparsers.add_parser("list", help="list registry models")
    p.add_argument("pattern", nargs="?", default="*")
    p.add_argument("--pretrained", action="store_true", help="only models with weights")
    p.set_defaults(func=_cmd_list)

    p = subparsers.add_parser("report",
                              help="results table of the shipped models of a dataset tag beside its baselines")
    p.add_argument("tag", nargs="?", default="fmnist")
    p.add_argument("--markdown", action="store_true", help="as a Markdown table (the README's)")
    p.set_defaults(func=_cmd_report)

    p = subparsers.add_parser("info", help="print a model's registry row")
    p.add_argument("name")
    p.set_defaults(func=_cmd_info)


def register_demo(subparsers: Any) -> None:
    """Add `demo` (listed last in `zoo --help`, as before)."""
    p = subparsers.add_parser("demo", help="the main job: load a shipped model, embed Fashion-MNIST, search, report")
    p.add_argument("--model", default=None, help="model name (default: the best shipped Fashion-MNIST model)")
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--grid", default="zoo-demo-retrieval.png", help="where to write the retrieval picture (PNG)")
    p.set_defaults(func=_cmd_demo)
