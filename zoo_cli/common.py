"""What several commands share: the model / weights / device arguments, loading that model, and inputs.

Inputs (`INPUTS`, `QUERY`) are image files and folders (recursive), or `fmnist:train` / `fmnist:test`
(optionally `fmnist:test:N`, the first N): Fashion-MNIST with its class names as labels.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch  # already imported by `zoo` itself; everything heavier is imported where used

from zoo.checkpoint import CHECKPOINT_FILE


FMNIST_SYNTAX = "fmnist:train, fmnist:test or fmnist:<train|test>:N (the first N images, N >= 0)"


def _parse_fmnist(spec: str) -> Any:
    """`fmnist:<split>[:N]` -> that `zoo.datasets.FashionMNISTSplit`; None for anything not starting `fmnist:`."""
    from zoo.datasets import fashion_mnist_split
    from zoo.errors import EmbedError

    parts = spec.split(":")
    if parts[0] != "fmnist" or len(parts) < 2:
        return None
    # A malformed one (fmnist:val, fmnist:test:-5) is an error, not a path that does not exist.
    if len(parts) > 3 or parts[1] not in ("train", "test") or (len(parts) == 3 and not parts[2].isdigit()):
        raise EmbedError(f"cannot read input {spec!r}: write {FMNIST_SYNTAX}")
    return fashion_mnist_split(parts[1], int(parts[2]) if len(parts) == 3 else None)


def resolve_inputs(items: Sequence[str]) -> Any:
    """CLI inputs -> something `zoo.embed` takes: a folder, a list of files, or a Fashion-MNIST split."""
    from zoo.errors import EmbedError
    from zoo.images import list_images

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


def add_model_args(p: argparse.ArgumentParser, model_help: str = "model name, e.g. wmse-resnet18_narrow.fmnist",
                   weights_help: str = "a .safetensors file or Hub-layout folder (default: the registry's)") -> None:
    """MODEL, --weights / --untrained [--seed], --device: how every command names the network it runs."""
    p.add_argument("model", help=model_help)
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help=weights_help)
    w.add_argument("--untrained", action="store_true", help="random weights (seeded by --seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of --untrained weights")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")


def model_info(args: argparse.Namespace) -> dict[str, Any]:
    """How to rebuild the same model later (`zoo search` re-embeds queries with it)."""
    if getattr(args, "untrained", False):
        return {"name": args.model, "weights": "untrained", "seed": args.seed}
    return {"name": args.model, "weights": args.weights or "registry"}


def load_model(info: dict[str, Any], device: str | None = None) -> torch.nn.Module:
    """The model `model_info` describes: registry weights, a weights file / folder, random, or a training run."""
    import zoo

    weights = info.get("weights", "registry")
    if weights == "untrained":
        torch.manual_seed(int(info.get("seed", 0)))  # the same random weights in every process
        return zoo.load(info["name"], pretrained=False, device=device)
    if weights != "registry" and is_training_run(weights):  # a `zoo train` run: its backbone, before export
        from zoo.checkpoint import read_checkpoint
        from zoo.load import load_weights_into

        model = zoo.load(info["name"], pretrained=False, device="cpu")
        load_weights_into(model, read_checkpoint(weights).backbone, str(weights))
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return zoo.load(info["name"], pretrained=True if weights == "registry" else weights, device=device)


def is_training_run(path: str) -> bool:
    """A `zoo train` run folder or its checkpoint.pt (read with zoo.checkpoint's reader, not as weights)."""
    p = Path(path)
    return p.suffix == ".pt" or (p.is_dir() and (p / CHECKPOINT_FILE).exists())
