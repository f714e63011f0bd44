"""Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist` package.

Lives in `zoo` (not `training`) because evaluation and the README's main job read it too.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from zoo.errors import ZooError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetNotFoundError(ZooError, FileNotFoundError):
    pass


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ZooError(f"{path} is not an uint8 IDX file (magic {data[:4].hex()}); reinstall it with "
                       f"`apt-get install --reinstall dataset-fashion-mnist`")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise ZooError(f"{path} is truncated ({arr.size} values for shape {shape}); reinstall it with "
                       f"`apt-get install --reinstall dataset-fashion-mnist`")
    return arr.reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}; install it with "
        f"`sudo apt-get install dataset-fashion-mnist` or pass root= a folder holding the IDX files")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `[N, 28, 28]` uint8 and labels `[N]` int64 of the `train` (60k) or `test` (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    images_file, labels_file = (_find(root, s) for s in _FILES[split])
    images = torch.from_numpy(_read_idx(images_file).copy())
    labels = torch.from_numpy(_read_idx(labels_file).astype(np.int64))
    if images.shape[0] != labels.shape[0]:
        raise ZooError(f"{images_file} has {images.shape[0]} images but {labels_file} {labels.shape[0]} labels")
    return images, labels


class FashionMNISTSplit(torch.utils.data.Dataset):
    """A labelled Fashion-MNIST split (or its first / last N images): uint8 `images [N, 28, 28]`, `labels [N]`.

    As a torch Dataset it yields `(image [1, 28, 28], label)`, and names its items `fmnist:<split>:<index>`
    (the index in the whole split), which `zoo.embed` takes as ids.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, split: str, images: torch.Tensor, labels: torch.Tensor, start: int = 0):
        self.split, self.images, self.labels, self.start = split, images, labels, start
        self.name = f"Fashion-MNIST {split}"
        self.ids = [f"fmnist:{split}:{start + i}" for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i][None], int(self.labels[i])


def fashion_mnist_split(split: str = "train", limit: int | None = None, from_end: bool = False,
                        root: str | os.PathLike | None = None) -> FashionMNISTSplit:
    """The `train` (60k) or `test` (10k) split, or its first `limit` images (its last with `from_end`).

    The one place every user of Fashion-MNIST (evaluation, transfer, precision checks, `zoo embed
    fmnist:test:N`, training) takes a split from, so a limit means the same images everywhere.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a number of images >= 0 (or None for the whole split), got {limit!r}")
    images, labels = load_fashion_mnist(split, root)
    n = len(images) if limit is None else min(limit, len(images))
    start = len(images) - n if from_end else 0
    return FashionMNISTSplit(split, images[start:start + n], labels[start:start + n], start)
