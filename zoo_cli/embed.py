"""`zoo embed`, `zoo index build`, `zoo search`: images -> resumable embedding shards -> FAISS index -> neighbours.

Each runs under torchrun too: ranks embed their share of the inputs, rank 0 merges and builds the index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from zoo_cli.common import add_model_args, load_model, model_info, resolve_inputs


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images")
    p.add_argument("--shard-size", type=int, default=10000, help="inputs per shard (resume granularity)")
    p.add_argument("--no-progress", action="store_true")


def cmd_embed(args: argparse.Namespace) -> int:
    from zoo.shards import embed_to_dir

    info = model_info(args)
    model = load_model(info, args.device)
    index = embed_to_dir(model, resolve_inputs(args.inputs), args.out, shard_size=args.shard_size,
                         batch_size=args.batch_size, backend=args.backend, precision=args.precision,
                         normalize=not args.no_normalize, progress=not args.no_progress,
                         num_workers=args.workers, merge=not args.no_merge, model_info=info,
                         layer=args.layer, pool=args.pool)
    if index is not None:  # rank 0 (or the only process)
        print(f"{args.out}: {index['embedded']} embedded ({index['dim']}-d), {index['failed']} unreadable, "
              f"{index['n_shards']} shard(s){', merged into features.npy + ids.json' if index['merged'] else ''}")
        if index["failed"]:
            print(f"unreadable inputs and reasons: {Path(args.out) / 'ids.json'} (failed) or the shard .json files")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from zoo.distributed import rank
    from zoo.index import Index, index_bytes
    from zoo.shards import embed_to_dir

    import zoo

    info = model_info(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise zoo.ZooError(f"--out {out} is a file; `zoo index build` writes a folder: pass a new folder path")
    from zoo.index_io import check_save_target

    check_save_target(out / "index")  # before the embedding, not after: a user's folder there is refused
    emb_dir = out / "embeddings"
    model = load_model(info, args.device)
    embed_to_dir(model, resolve_inputs(args.inputs), emb_dir, shard_size=args.shard_size, batch_size=args.batch_size,
                 backend=args.backend, precision=args.precision, progress=not args.no_progress,
                 num_workers=args.workers, merge=False, model_info={**info, "backend": args.backend,
                                                                   "precision": args.precision})
    if rank() != 0:  # under torchrun, rank 0 builds the index from everyone's shards
        return 0
    index = Index.from_shards(emb_dir, metric=args.metric, kind=args.kind, progress=not args.no_progress)
    _label_names(index)
    index.save(out / "index")
    print(f"{out / 'index'}: {index.ntotal} vectors, {index.factory} ({index.metric}), "
          f"{index_bytes(index) / max(index.ntotal, 1):.0f} bytes/vector; search it with `zoo search {out} IMAGE`")
    return 0


def _label_names(index) -> None:
    """Fashion-MNIST labels are stored as class names, which is what a reader of a grid wants."""
    from zoo.datasets import FASHION_MNIST_CLASSES

    if index.labels is not None and index.ids and str(index.ids[0]).startswith("fmnist:"):
        index.labels = [FASHION_MNIST_CLASSES[int(v)] for v in index.labels]


def _image_of(item_id: Any) -> Any:
    """What the grid draws for an id: a path, or a Fashion-MNIST image for `fmnist:<split>:<i>`."""
    s = str(item_id)
    if s.startswith("fmnist:"):
        from zoo.datasets import load_fashion_mnist

        _, split, i = s.split(":")
        return load_fashion_mnist(split)[0][int(i)]
    return item_id


def cmd_search(args: argparse.Namespace) -> int:
    import zoo
    from zoo.datasets import FASHION_MNIST_CLASSES
    from zoo.embed import embed
    from zoo.grid import GridRow, retrieval_grid

    index = zoo.Index.load(args.index)
    info = index.model if isinstance(index.model, dict) else {"name": index.model}
    if not info or not info.get("name"):
        raise zoo.ZooError(f"{args.index} does not name its model; rebuild it with `zoo index build`")
    model = load_model(info, args.device)
    queries = embed(model, resolve_inputs(args.query), backend=info.get("backend", "torch"),
                    precision=info.get("precision", "fp32"), progress=False)
    for qid, reason in queries.failed:
        print(f"skipped query {qid}: {reason}", file=sys.stderr)
    if not len(queries):
        raise zoo.ZooError("no query could be read")
    k = args.k
    if k > index.ntotal:
        print(f"the index holds {index.ntotal} vectors: showing k={index.ntotal}", file=sys.stderr)
        k = index.ntotal
    scores, ids = index.search(queries.features, k)
    score_name = "sim" if index.metric == "cosine" else "d2"
    rows = []
    for qi, qid in enumerate(queries.ids):
        labels = index.labels_of(ids[qi])
        qlabel = None
        if queries.labels is not None and str(qid).startswith("fmnist:"):
            qlabel = FASHION_MNIST_CLASSES[int(queries.labels[qi])]
        print(f"{qid}{f' [{qlabel}]' if qlabel else ''}")
        for rank, (s, i, lab) in enumerate(zip(scores[qi], ids[qi], labels), 1):
            print(f"  {rank:3d}. {score_name} {s:.4f}  {i}{f'  [{lab}]' if lab is not None else ''}")
        rows.append(GridRow(_image_of(qid), [_image_of(i) for i in ids[qi]], scores[qi].tolist(), qlabel, labels))
    if args.grid:
        path = retrieval_grid(rows, args.grid, score_name=score_name)
        print(f"retrieval grid: {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add `embed`, `index build` and `search` to `zoo`'s sub-parsers."""
    p = subparsers.add_parser("embed", help="embed images into a resumable folder of shards (torchrun-ready)")
    add_model_args(p)
    p.add_argument("inputs", nargs="+", help="image files, folders, or fmnist:train|test[:N]")
    p.add_argument("--out", required=True, help="output folder (resumes if it holds the same run)")
    _add_embed_args(p)
    p.add_argument("--no-normalize", action="store_true", help="keep raw features (default: L2-normalised)")
    p.add_argument("--no-merge", action="store_true", help="keep the shards only (no features.npy)")
    p.add_argument("--layer", default=None, choices=["stem", "layer1", "layer2", "layer3", "layer4"],
                   help="features of this stage (default layer4, the model's pooled features)")
    p.add_argument("--pool", default="avg", choices=["avg", "gem", "max", "none"],
                   help="pooling of the stage's map: avg (default), gem (p=3), max, none (map flattened; "
                        "its shape goes to config.json)")
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser("index", help="build FAISS indexes")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed inputs and build an index: OUT/embeddings (shards), OUT/index")
    add_model_args(b)
    b.add_argument("inputs", nargs="+", help="image files, folders, or fmnist:train|test[:N]")
    b.add_argument("--out", required=True)
    b.add_argument("--kind", default="flat", help="flat, ivf, hnsw, sq8, or a FAISS factory string")
    b.add_argument("--metric", choices=["cosine", "l2"], default="cosine")
    _add_embed_args(b)
    b.set_defaults(func=cmd_index_build)

    p = subparsers.add_parser("search", help="nearest neighbours of query images in an index")
    p.add_argument("index", help="folder written by `zoo index build` (or Index.save)")
    p.add_argument("query", nargs="+", help="query image files, folders, or fmnist:test[:N]")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--grid", default=None, help="write a PNG of each query and its neighbours")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_search)
