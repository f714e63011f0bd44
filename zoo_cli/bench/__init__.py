"""`zoo bench embed | index | train`: benchmarks measured side by side in one run (`python -m zoo_cli.bench ...`).

Each benchmark is a module here (embed, index, train); they time the library and the trainer, so they sit
in the command line's layer, above both. The modules load only when their benchmark runs.
"""

from __future__ import annotations

import argparse
from typing import Any


def _cmd_embed(args: argparse.Namespace) -> int:
    from zoo_cli.bench.embed import bench_embed

    bench_embed(models=args.models, batch_size=args.batch_size, batches=args.batches, check=not args.no_check,
                image_size=args.image_size, pipeline_images=args.pipeline_images, pipeline_batch=args.pipeline_batch)
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from zoo_cli.bench.index import bench_index

    bench_index(exact_n=args.exact_n, exact_dim=args.exact_dim, queries=args.queries, k=args.k,
                ann_n=args.ann_n, ann_dim=args.ann_dim, ann_queries=args.ann_queries)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from zoo_cli.bench.train import bench_train

    bench_train(args.methods or None, steps=args.steps, batch_size=args.batch_size, dataset=args.dataset,
                bf16=args.bf16, compile_mode=args.compile_mode or ("default" if args.compile else None))
    return 0


def register(subparsers: Any) -> None:
    """Add the `bench` group (`embed`, `index`, `train`) to `zoo`'s sub-parsers."""
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)

    p = bench.add_parser("embed", help="embedding throughput: eager vs onnxruntime vs our backends/precisions")
    p.add_argument("--models", nargs="+", default=["wmse-resnet50", "wmse-resnet18_narrow.fmnist"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="timed batches per variant (after one warm-up)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input size")
    p.add_argument("--no-check", action="store_true", help="skip the bf16/int8 quality checks (not accepted then)")
    p.add_argument("--pipeline-images", type=int, default=2048,
                   help="time the whole zoo.embed call (tensor, PIL list, JPEG folder) beside the bare forward on "
                        "this many images (0: skip)")
    p.add_argument("--pipeline-batch", type=int, default=256, help="batch size of the pipeline comparison")
    p.set_defaults(func=_cmd_embed)

    p = bench.add_parser("index", help="exact and approximate k-NN search: FAISS vs torch vs scikit-learn")
    p.add_argument("--exact-n", type=int, default=100_000)
    p.add_argument("--exact-dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--ann-n", type=int, default=1_000_000)
    p.add_argument("--ann-dim", type=int, default=128)
    p.add_argument("--ann-queries", type=int, default=1000)
    p.set_defaults(func=_cmd_index)

    p = bench.add_parser("train", help="per method at its Fashion-MNIST recipe: img/s, augment and loss shares")
    p.add_argument("methods", nargs="*", help="default: all methods")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--dataset", default=None, help="e.g. synthetic (tiny smoke runs)")
    p.add_argument("--bf16", action="store_true", help="also time each step under bf16 autocast + channels-last and "
                                                       "print the speed-up over the recipe")
    p.add_argument("--compile", action="store_true", help="also time each step with train.compile (torch.compile of "
                                                          "the networks) and print the speed-up and compile seconds")
    p.add_argument("--compile-mode", default=None, help="the torch.compile mode for --compile (implies it): default, "
                                                        "reduce-overhead, max-autotune, max-autotune-no-cudagraphs")
    p.set_defaults(func=_cmd_train)
