"""CLI sub-commands for embedding, indexing, search, evaluation and benchmarks.

`register(subparsers)` adds `embed`, `index build`, `search`, `eval knn`, `eval linear` and a `bench`
group (`bench embed`, `bench index`) to the `zoo` parser and returns the bench group's sub-parsers,
so more benchmarks can join it (`register_bench` adds ours to any such group). Heavy imports happen
inside the handlers. `python -m zoo.commands ...` runs these commands alone (also under torchrun).

Inputs (`INPUTS`, `QUERY`) are image files and folders (recursive), or `fmnist:train` /
`fmnist:test` (optionally `fmnist:test:N`, the first N): Fashion-MNIST with its class names as labels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch  # already imported by `zoo` itself; everything heavier is imported in the handlers


# ------------------------------------------------------------------------------------------ helpers
class FashionMNISTSplit(torch.utils.data.Dataset):
    """A torch Dataset of Fashion-MNIST images + labels, items named `fmnist:<split>:<i>`."""

    def __init__(self, split: str, limit: int | None = None):
        from zoo.datasets import load_fashion_mnist

        self.split = split
        self.images, self.labels = load_fashion_mnist(split)
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.ids = [f"fmnist:{split}:{i}" for i in range(len(self.images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][None], int(self.labels[i])


def _parse_fmnist(spec: str) -> FashionMNISTSplit | None:
    parts = spec.split(":")
    if parts[0] != "fmnist" or len(parts) not in (2, 3) or parts[1] not in ("train", "test"):
        return None
    return FashionMNISTSplit(parts[1], int(parts[2]) if len(parts) == 3 else None)


def resolve_inputs(items: Sequence[str]) -> Any:
    """CLI inputs -> something `zoo.embed` takes: a folder, a list of files, or a Fashion-MNIST split."""
    from zoo.embed import EmbedError, list_images

    datasets = [d for d in (_parse_fmnist(i) for i in items) if d is not None]
    if datasets:
        if len(items) != 1:
            raise EmbedError("pass fmnist:<split> alone, not mixed with other inputs")
        return datasets[0]
    if len(items) == 1 and Path(items[0]).is_dir():
        return items[0]
    files: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(list_images(p))
        elif p.exists():
            files.append(item)
        else:
            raise EmbedError(f"{item} does not exist (inputs are image files, folders, or fmnist:train|test)")
    return files


def model_info(args: argparse.Namespace) -> dict[str, Any]:
    """How to rebuild the same model later (`zoo search` re-embeds queries with it)."""
    if getattr(args, "untrained", False):
        return {"name": args.model, "weights": "untrained", "seed": args.seed}
    return {"name": args.model, "weights": args.weights or "registry"}


def load_model(info: dict[str, Any], device: str | None = None):
    import torch

    import zoo

    weights = info.get("weights", "registry")
    if weights == "untrained":
        torch.manual_seed(int(info.get("seed", 0)))  # the same random weights in every process
        return zoo.load(info["name"], pretrained=False, device=device)
    if weights != "registry" and _is_training_run(weights):  # a `zoo train` run: its backbone, before export
        from export.checkpoint import read_checkpoint
        from zoo.load import load_weights_into

        model = zoo.load(info["name"], pretrained=False, device="cpu")
        load_weights_into(model, read_checkpoint(weights).backbone, str(weights))
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return zoo.load(info["name"], pretrained=True if weights == "registry" else weights, device=device)


def _is_training_run(path: str) -> bool:
    p = Path(path)
    return p.suffix == ".pt" or (p.is_dir() and (p / "checkpoint.pt").exists())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, e.g. wmse-resnet18_narrow.fmnist")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="a .safetensors file or Hub-layout folder (default: the registry's)")
    w.add_argument("--untrained", action="store_true", help="random weights (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --untrained weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images")
    p.add_argument("--shard-size", type=int, default=10000, help="inputs per shard (resume granularity)")
    p.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------ handlers
def cmd_embed(args: argparse.Namespace) -> int:
    from zoo.embed import embed_to_dir

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
    from zoo.embed import embed_to_dir
    from zoo.index import Index, index_bytes

    info = model_info(args)
    out = Path(args.out)
    emb_dir = out / "embeddings"
    model = load_model(info, args.device)
    embed_to_dir(model, resolve_inputs(args.inputs), emb_dir, shard_size=args.shard_size, batch_size=args.batch_size,
                 backend=args.backend, precision=args.precision, progress=not args.no_progress,
                 num_workers=args.workers, merge=False, model_info={**info, "backend": args.backend,
                                                                   "precision": args.precision})
    if _rank_world()[0] != 0:  # under torchrun, rank 0 builds the index from everyone's shards
        return 0
    index = Index.from_shards(emb_dir, metric=args.metric, kind=args.kind, progress=not args.no_progress)
    _label_names(index)
    index.save(out / "index")
    print(f"{out / 'index'}: {index.ntotal} vectors, {index.factory} ({index.metric}), "
          f"{index_bytes(index) / max(index.ntotal, 1):.0f} bytes/vector; search it with `zoo search {out} IMAGE`")
    return 0


def _rank_world() -> tuple[int, int]:
    from zoo.embed import _dist_info

    return _dist_info()


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


def _cmd_eval(args: argparse.Namespace, protocols: tuple[str, ...]) -> int:
    from zoo.eval import evaluate_model, evaluate_pixels, knn_protocol_labels

    knn_protocol = getattr(args, "protocol", None)  # `eval knn --protocol NAME`: that project's k-NN instead
    if args.dataset not in ("fmnist", "fashion_mnist"):
        raise ValueError(f"--dataset must be fmnist (the dataset on every machine), got {args.dataset!r}")
    if args.model == "pixels":
        name = "raw pixels (standardised 784-d)"
        res = evaluate_pixels(args.limit_train, args.limit_test, progress=not args.no_progress, protocols=protocols,
                              knn_protocol=knn_protocol)
    else:
        info = model_info(args)
        model = load_model(info, args.device)
        name = f"{model.spec.name}{' (untrained)' if args.untrained else ''}"
        res = evaluate_model(model, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                             progress=not args.no_progress, limit_train=args.limit_train,
                             limit_test=args.limit_test, protocols=protocols, knn_protocol=knn_protocol)
    if args.results:
        _write_results(Path(args.results), res, args)
    if args.json:
        print(json.dumps({"model": name, **res}))
        return 0
    n_train = args.limit_train or 60000
    n_test = args.limit_test or 10000
    print(f"{name} on Fashion-MNIST (train {n_train}, test {n_test}), top-1 %:")
    labels = {"knn_k20": "dino protocol: weighted k-NN, cosine, k=20, T=0.07",
              "knn_k200": "dino protocol: weighted k-NN, cosine, k=200, T=0.07",
              "knn5_majority": "wmse protocol: majority k-NN, Euclidean, k=5",
              "linear": "linear probe (L-BFGS, standardised)", **knn_protocol_labels()}
    width = max([14, *map(len, res)])
    for key, value in res.items():
        print(f"  {key:{width}s} {value:6.2f}   {labels[key]}")
    return 0


EVAL_PROTOCOL = ("Fashion-MNIST, backbone features of model.preprocess'd images; train 60k as bank / probe "
                 "training set, test 10k. Weighted k-NN: cosine, votes exp(sim/0.07), k=20 and 200. Majority "
                 "k-NN: k=5, Euclidean on raw features (W-MSE's protocol). Linear probe: standardised features, "
                 "L-BFGS on nn.Linear, fixed iterations (zoo.eval).")


def _write_results(path: Path, res: dict[str, float], args: argparse.Namespace) -> None:
    """Merge measured numbers into a results.json that `zoo export` turns into the model card."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: round(float(v), 2) for k, v in res.items()})
    data["protocol"] = EVAL_PROTOCOL
    if args.weights and _is_training_run(args.weights):
        from export.checkpoint import checkpoint_path

        import torch

        ckpt = torch.load(checkpoint_path(args.weights), map_location="cpu", weights_only=True)
        if ckpt.get("train_seconds"):
            data["train_minutes"] = round(float(ckpt["train_seconds"]) / 60, 1)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name, or 'pixels' for the raw-pixel baseline")
    p.add_argument("--results", default=None, help="merge the numbers into this results.json (read by zoo export)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="a .safetensors file, Hub-layout folder, or a `zoo train` run / checkpoint.pt")
    w.add_argument("--untrained", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (default all 60k)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default all 10k)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.add_argument("--no-progress", action="store_true")


def cmd_bench_embed(args: argparse.Namespace) -> int:
    from zoo.bench import bench_embed

    bench_embed(models=args.models, batch_size=args.batch_size, batches=args.batches, check=not args.no_check,
                image_size=args.image_size)
    return 0


def cmd_bench_index(args: argparse.Namespace) -> int:
    from zoo.bench import bench_index

    bench_index(exact_n=args.exact_n, exact_dim=args.exact_dim, queries=args.queries, k=args.k,
                ann_n=args.ann_n, ann_dim=args.ann_dim, ann_queries=args.ann_queries)
    return 0


# ------------------------------------------------------------------------------------------ parsers
def register_bench(bench: Any) -> None:
    """Add `embed` and `index` to a `bench` group's sub-parsers."""
    p = bench.add_parser("embed", help="embedding throughput: eager vs onnxruntime vs our backends/precisions")
    p.add_argument("--models", nargs="+", default=["wmse-resnet50", "wmse-resnet18_narrow.fmnist"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="timed batches per variant (after one warm-up)")
    p.add_argument("--image-size", type=int, default=None, help="override the model's input size")
    p.add_argument("--no-check", action="store_true", help="skip the bf16/int8 quality checks (not accepted then)")
    p.set_defaults(func=cmd_bench_embed)

    p = bench.add_parser("index", help="exact and approximate k-NN search: FAISS vs torch vs scikit-learn")
    p.add_argument("--exact-n", type=int, default=100_000)
    p.add_argument("--exact-dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--ann-n", type=int, default=1_000_000)
    p.add_argument("--ann-dim", type=int, default=128)
    p.add_argument("--ann-queries", type=int, default=1000)
    p.set_defaults(func=cmd_bench_index)


def register(subparsers: Any) -> Any:
    """Add our sub-commands to `zoo`'s sub-parsers; returns the `bench` group's sub-parsers."""
    p = subparsers.add_parser("embed", help="embed images into a resumable folder of shards (torchrun-ready)")
    _add_model_args(p)
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
    _add_model_args(b)
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

    p = subparsers.add_parser("eval", help="evaluation protocols on Fashion-MNIST")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("knn", help="weighted k-NN (k=20, 200) and majority k-NN (k=5)")
    _add_eval_args(e)
    from zoo.eval import KNN_PROTOCOLS

    e.add_argument("--protocol", choices=list(KNN_PROTOCOLS), default=None,
                   help="another project's k-NN instead (results keyed knn_<name>_k<k>): "
                        + "; ".join(p.describe() for p in KNN_PROTOCOLS.values()))
    e.set_defaults(func=lambda a: _cmd_eval(a, ("knn", "majority")))
    e = esub.add_parser("linear", help="linear probe on frozen features (--labels 1%% 10%%: class-balanced subsets)")
    _add_eval_args(e)
    from zoo.transfer import add_label_args, cmd_eval_linear, cmd_finetune, register_transfer

    add_label_args(e)  # label-efficient transfer (zoo/transfer.py); without --labels / --train: as before
    e.set_defaults(func=lambda a: cmd_eval_linear(a, lambda b: _cmd_eval(b, ("linear",))))
    e = esub.add_parser("finetune", help="fine-tune the whole network on class-balanced label subsets")
    _add_eval_args(e)
    add_label_args(e, finetune=True)
    e.set_defaults(func=cmd_finetune)
    register_transfer(subparsers)  # zoo transfer detect RECIPE

    p = subparsers.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench_command", required=True)
    register_bench(bench)
    return bench
