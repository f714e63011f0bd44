"""`zoo eval knn | linear | finetune`: evaluation protocols on Fashion-MNIST (or ImageFolders for transfer).

    zoo eval knn      wmse-resnet18_narrow.fmnist [--protocol dinov2] [--results runs/.../results.json]
    zoo eval linear   wmse-resnet18_narrow.fmnist --labels 1% 10%       # label-efficient (zoo.transfer)
    zoo eval finetune MODEL --train my/train --val my/val --labels 10%  # any ImageFolder

The protocols themselves live in the library (zoo.eval, zoo.transfer); here: arguments, printing, and
merging the numbers into the results.json that `zoo export` turns into the model card.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from zoo.datasets import fashion_mnist_split
from zoo.registry import get_dataset
from zoo.transfer import (FINETUNE_BATCH, FINETUNE_EPOCHS, LABEL_SEED, LabelledSplit, TransferError, finetune_transfer,
                          image_folder, linear_transfer, merge_results, parse_labels, pixel_linear_transfer,
                          protocol_text)
from zoo_cli.common import add_model_args, is_training_run, load_model, model_info

PIXELS_NAME = "raw pixels (standardised 784-d)"  # `zoo eval ... pixels`: the baseline without a network

EVAL_PROTOCOL = ("Fashion-MNIST, backbone features of model.preprocess'd images; train 60k as bank / probe "
                 "training set, test 10k. Weighted k-NN: cosine, votes exp(sim/0.07), k=20 and 200. Majority "
                 "k-NN: k=5, Euclidean on raw features (W-MSE's protocol). Linear probe: standardised features, "
                 "L-BFGS on nn.Linear, fixed iterations (zoo.eval).")


# ------------------------------------------------------------------------------------------ full labels
def _cmd_eval(args: argparse.Namespace, protocols: tuple[str, ...]) -> int:
    from zoo.eval import evaluate_model, evaluate_pixels
    from zoo.knn import knn_protocol_labels

    knn_protocol = getattr(args, "protocol", None)  # `eval knn --protocol NAME`: that project's k-NN instead
    if get_dataset(args.dataset).tag != "fmnist":
        raise ValueError(f"--dataset must be fmnist (the dataset on every machine), got {args.dataset!r}")
    if args.model == "pixels":
        name = PIXELS_NAME
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
        _write_results(Path(args.results), res, args, None if args.model == "pixels" else _measured_on(model, args))
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


def _measured_on(model: Any, args: argparse.Namespace) -> str:
    """Which weights the numbers belong to, in words the card prints (the shipped file may be an fp16 cast)."""
    if args.untrained:
        return f"untrained weights (seed {args.seed})"
    if args.weights and is_training_run(args.weights):
        return f"the fp32 weights of the training checkpoint `{Path(args.weights).name}`"
    dtype = {p.dtype for p in model.state_dict().values() if p.is_floating_point()}
    source = Path(args.weights).name if args.weights else f"the shipped {model.spec.weights_file}"
    loaded = "/".join(sorted(str(d).removeprefix("torch.") for d in dtype))
    return f"{source} (sha256 {str(model.spec.sha256)[:12]}..., loaded as {loaded})"


def _write_results(path: Path, res: dict[str, float], args: argparse.Namespace, measured_on: str | None) -> None:
    """Merge measured numbers into a results.json that `zoo export` turns into the model card."""
    from zoo.checkpoint import update_results

    values: dict[str, Any] = {**res, "protocol": EVAL_PROTOCOL}
    if measured_on:
        values["measured_on"] = measured_on
    if args.weights and is_training_run(args.weights):
        from zoo.checkpoint import checkpoint_path, load_checkpoint

        ckpt = load_checkpoint(checkpoint_path(args.weights))
        if ckpt.get("train_seconds"):
            values["train_minutes"] = round(float(ckpt["train_seconds"]) / 60, 1)
        hardware = json.loads(ckpt.get("hardware") or "[]")
        if hardware:  # summed minutes over every session, so every machine they ran on
            values["hardware"] = " + ".join(hardware)
    print(f"wrote {update_results(path, values)}")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p, model_help="model name, or 'pixels' for the raw-pixel baseline",
                   weights_help="a .safetensors file, Hub-layout folder, or a `zoo train` run / checkpoint.pt")
    p.add_argument("--results", default=None, help="merge the numbers into this results.json (read by zoo export)")
    p.add_argument("--dataset", default="fmnist")
    p.add_argument("--limit-train", type=int, default=None, help="first N training images (default all 60k)")
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default all 10k)")
    p.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON line")
    p.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------ label-efficient transfer
def add_label_args(p: argparse.ArgumentParser, finetune: bool = False) -> None:
    """`--labels`, `--label-seed`, `--train/--val` (and the fine-tuning knobs) on an `eval` sub-parser."""
    p.add_argument("--labels", nargs="+", default=["10%"] if finetune else None, metavar="PCT",
                   help="class-balanced fraction(s) of the training labels, e.g. 1%% 10%% 100%%"
                        + (" (default 10%%)" if finetune else " (default: the full-label protocol)"))
    p.add_argument("--label-seed", type=int, default=LABEL_SEED, help="seed of the label subsets (default 0)")
    p.add_argument("--train", default=None, metavar="DIR", help="an ImageFolder to train on instead of --dataset")
    p.add_argument("--val", default=None, metavar="DIR", help="its evaluation ImageFolder (same class folders)")
    if finetune:
        p.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS, help="epochs over the labelled subset (1)")
        p.add_argument("--lr", type=float, default=None, help="SGD lr (default 0.05 x batch / 256)")
        p.add_argument("--max-steps", type=int, default=None, help="stop after N steps (smoke tests)")


def _splits(args: argparse.Namespace) -> tuple[LabelledSplit, LabelledSplit, str]:
    if bool(args.train) != bool(args.val):
        raise TransferError("pass --train DIR and --val DIR together (ImageFolders with the same class folders)")
    if args.train:
        train = image_folder(args.train)
        test = image_folder(args.val, classes=train.classes)
        if args.limit_train:
            train = train.take(torch.arange(min(args.limit_train, len(train))))
        if args.limit_test:
            test = test.take(torch.arange(min(args.limit_test, len(test))))
        return train, test, f"ImageFolder {args.train} (train) / {args.val} (val), {len(train.classes)} classes"
    if get_dataset(args.dataset).tag != "fmnist":
        raise TransferError(f"--dataset must be fmnist, or pass --train DIR --val DIR; got {args.dataset!r}")
    train = LabelledSplit.of(fashion_mnist_split("train", args.limit_train))
    test = LabelledSplit.of(fashion_mnist_split("test", args.limit_test))
    return train, test, f"Fashion-MNIST (train {len(train)}, test {len(test)})"


def _report(args: argparse.Namespace, name: str, dataset: str, results: list[dict[str, Any]]) -> int:
    if args.results:
        print(f"wrote {merge_results(args.results, results, dataset)}")
    if args.json:
        print(json.dumps({"model": name, **{r["key"]: r["top1"] for r in results}}))
        return 0
    print(f"{name} on {dataset}, top-1 %:")
    for r in results:
        print(f"  {r['key']:16s} {r['top1']:6.2f}   {protocol_text(r, dataset)}")
    return 0


def _model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    if args.model == "pixels":
        raise TransferError("the raw-pixel baseline has no network to fine-tune; run `zoo eval linear pixels "
                            "--labels ...` for its label-efficient numbers, or name a model")
    model = load_model(model_info(args), args.device)
    return model, f"{model.spec.name}{' (untrained)' if args.untrained else ''}"


def cmd_linear_labels(args: argparse.Namespace) -> int:
    """`zoo eval linear MODEL --labels 1% 10%` / `--train DIR --val DIR`."""
    train, test, dataset = _splits(args)
    if args.model == "pixels":
        results = [pixel_linear_transfer(train, test, parse_labels(p), args.label_seed)
                   for p in (args.labels or ["100%"])]
        return _report(args, PIXELS_NAME, dataset, results)
    model, name = _model(args)
    results = [linear_transfer(model, train, test, parse_labels(p), args.label_seed, args.batch_size, args.backend,
                               args.precision, progress=not args.no_progress) for p in (args.labels or ["100%"])]
    return _report(args, name, dataset, results)


def cmd_finetune(args: argparse.Namespace) -> int:
    """`zoo eval finetune MODEL --labels 10%`: whole-network fine-tuning on a class-balanced subset."""
    if args.backend != "torch" or args.precision != "fp32":
        raise TransferError("fine-tuning trains in fp32 on torch; drop --backend / --precision")
    train, test, dataset = _splits(args)
    model, name = _model(args)
    results = [finetune_transfer(model, train, test, parse_labels(p), args.label_seed, epochs=args.epochs,
                                 batch_size=args.batch_size or FINETUNE_BATCH, lr=args.lr,
                                 progress=not args.no_progress, max_steps=args.max_steps) for p in args.labels]
    return _report(args, name, dataset, results)


def cmd_eval_linear(args: argparse.Namespace) -> int:
    """The `eval linear` entry: label-efficient with --labels / --train, else the full-label protocol."""
    if args.labels or args.train or args.val:
        return cmd_linear_labels(args)
    return _cmd_eval(args, ("linear",))


def register(subparsers: Any) -> None:
    """Add `eval knn`, `eval linear` and `eval finetune` to `zoo`'s sub-parsers."""
    from zoo.knn import KNN_PROTOCOLS

    p = subparsers.add_parser("eval", help="evaluation protocols on Fashion-MNIST")
    esub = p.add_subparsers(dest="eval_command", required=True)
    e = esub.add_parser("knn", help="weighted k-NN (k=20, 200) and majority k-NN (k=5)")
    _add_eval_args(e)
    e.add_argument("--protocol", choices=list(KNN_PROTOCOLS), default=None,
                   help="another project's k-NN instead (results keyed knn_<name>_k<k>): "
                        + "; ".join(p.describe() for p in KNN_PROTOCOLS.values()))
    e.set_defaults(func=lambda a: _cmd_eval(a, ("knn", "majority")))
    e = esub.add_parser("linear", help="linear probe on frozen features (--labels 1%% 10%%: class-balanced subsets)")
    _add_eval_args(e)
    add_label_args(e)  # label-efficient transfer; without --labels / --train: the full-label protocol
    e.set_defaults(func=cmd_eval_linear)
    e = esub.add_parser("finetune", help="fine-tune the whole network on class-balanced label subsets")
    _add_eval_args(e)
    add_label_args(e, finetune=True)
    e.set_defaults(func=cmd_finetune)
