"""Training data: every dataset yields fixed-size uint8 images `[C, H, W]` and an int label.

Augmentation happens on the batch afterwards (`training.augment`, on the GPU when there is one), so
the data path only decodes. Small datasets (Fashion-MNIST, CIFAR, STL-10) live in memory as one
uint8 tensor; image folders (ImageNet, ImageNet-100, Tiny ImageNet) decode in DataLoader workers,
where a corrupt file is skipped and counted, never a crash.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from zoo.datasets import DatasetNotFoundError, fashion_mnist_split
from zoo.registry import TRAINER_DATASETS

# One list of image extensions for embedding and training: a folder trains on what `zoo embed` reads.
from zoo.images import IMAGE_EXTENSIONS


class TensorImages(Dataset):
    """Images held in memory as uint8 `[N, C, H, W]` with labels `[N]` (-1 when unlabelled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dim() == 3:
            images = images[:, None]
        self.images, self.labels = images.contiguous(), labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[indices], self.labels[indices]


class ImageFolderImages(Dataset):
    """`root/<class>/<image>` decoded in workers to `size x size` uint8 RGB (resize + centre square).

    The square is taken once at decode time so batched crops can run on the GPU; crops are thus
    drawn from the central square of each image (a deviation from per-image PIL crops, small for
    ImageNet's ~4:3 images). A file that cannot be decoded yields None and is counted.
    """

    def __init__(self, root: str | os.PathLike, size: int, classes: list[str] | None = None):
        from torchvision.datasets.folder import find_classes

        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DatasetNotFoundError(f"image folder {self.root} does not exist; pass data.root=<folder with one "
                                       f"sub-folder per class>")
        found, _ = find_classes(str(self.root))
        self.classes = [c for c in found if classes is None or c in set(classes)]
        if classes is not None and len(self.classes) != len(classes):
            missing = sorted(set(classes) - set(self.classes))
            raise DatasetNotFoundError(f"{len(missing)} classes of the list are missing under {self.root} "
                                       f"(e.g. {missing[:3]}); check data.root")
        self.samples = [(p, label) for label, c in enumerate(self.classes)
                        for p in sorted((self.root / c).rglob("*")) if p.suffix.lower() in IMAGE_EXTENSIONS]
        if not self.samples:
            raise DatasetNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int] | None:
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                im = F.center_crop(F.resize(im, self.size, antialias=True), self.size)
                return F.pil_to_tensor(im), label
        except Exception:  # corrupt/truncated/unsupported file: skipped and counted by the collate
            return None


def collate_skipping_corrupt(samples: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; unreadable ones are counted and their slots refilled by repeating
    readable images of the same batch, so every batch keeps its size (W-MSE sub-batches, ISD's queue
    and DDP's lock-step all need that)."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        raise RuntimeError(f"none of the {len(samples)} images of a batch could be decoded; check the dataset files")
    good += [good[i % len(good)] for i in range(skipped)]
    return torch.stack([s[0] for s in good]), torch.tensor([s[1] for s in good]), skipped


def _torchvision_dataset(name: str, root: str | None, split: str) -> TensorImages:
    import numpy as np
    from torchvision import datasets as tvd

    if not root:
        raise DatasetNotFoundError(f"{name} needs data.root=<folder>; put torchvision's {name} files there "
                                   f"(nothing is downloaded)")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            ds = cls(root, train=split == "train", download=False)
            return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets))
        if name == "stl10":
            ds = tvd.STL10(root, split={"train": "train+unlabeled", "labelled": "train"}.get(split, split),
                           download=False)
            return TensorImages(torch.from_numpy(np.ascontiguousarray(ds.data)), torch.from_numpy(ds.labels).long())
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True..."
        raise DatasetNotFoundError(f"{name} not found under {root} ({e}); place torchvision's {name} files there "
                                   f"(e.g. cifar-10-batches-py/, stl10_binary/)") from e
    raise ValueError(name)


def synthetic_images(n: int, size: int = 28, channels: int = 1, classes: int = 10, seed: int = 0) -> TensorImages:
    """Generated images with class structure (a class-dependent blob + noise), for tests."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.rand(classes, 2, generator=g) * size * 0.6 + size * 0.2
    blobs = torch.exp(-((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2)
                      / (2 * (size / 6) ** 2))
    images = blobs[labels] * 200 + torch.rand(n, size, size, generator=g) * 55
    images = images[:, None].expand(-1, channels, -1, -1)
    return TensorImages(images.round().clamp(0, 255).to(torch.uint8).contiguous(), labels)


def build_dataset(cfg: dict, split: str = "train") -> Dataset:
    """The recipe's `data:` section -> a Dataset. split: 'train' (SSL), 'labelled' (k-NN bank), 'test'."""
    name, root = cfg["dataset"], cfg.get("root")
    if name == "fashion_mnist":
        fmnist = fashion_mnist_split("test" if split == "test" else "train", root=root)
        return TensorImages(fmnist.images, fmnist.labels)
    if name == "synthetic":
        n = int(cfg.get("size", 512)) if split != "test" else int(cfg.get("test_size", 256))
        return synthetic_images(n, seed=0 if split != "test" else 1)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision_dataset(name, root, split)
    if name in ("imagenet", "imagenet100", "tiny_imagenet"):
        if not root:
            raise DatasetNotFoundError(f"{name} needs data.root=<folder with train/ and val/ image folders>")
        sub = {"train": "train", "labelled": "train", "test": cfg.get("test_split", "val")}[split]
        classes = None
        if name == "imagenet100":
            from training.imagenet100 import CMC_IMAGENET100_CLASSES

            classes = CMC_IMAGENET100_CLASSES
        return ImageFolderImages(Path(root) / sub, size=int(cfg.get("load_size", 64 if name == "tiny_imagenet" else 256)),
                                 classes=classes)
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(TRAINER_DATASETS)}")


@dataclass
class BatchPlan:
    """Which image indices form each batch: a seeded permutation per epoch, sliced per rank.

    The global batch b of epoch e is `perm_e[b*B:(b+1)*B]`; rank r of W takes its contiguous
    `B/W` slice, so concatenating the ranks' batches gives the single-process batch, and a
    resumed run (epoch, batch) re-creates exactly the same batches.
    """

    n: int
    global_batch: int
    seed: int
    rank: int = 0
    world: int = 1

    def __post_init__(self):
        if self.global_batch % self.world:
            raise ValueError(f"batch_size {self.global_batch} is not divisible by {self.world} processes")
        if self.n < self.global_batch:
            raise ValueError(f"dataset has {self.n} images, fewer than one batch of {self.global_batch}; "
                             f"lower data.batch_size")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch  # drop_last: every batch full (W-MSE, queues need it)

    def indices(self, epoch: int, start_batch: int = 0) -> Iterator[torch.Tensor]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
        local = self.global_batch // self.world
        for b in range(start_batch, self.batches_per_epoch):
            chunk = perm[b * self.global_batch:(b + 1) * self.global_batch]
            yield chunk[self.rank * local:(self.rank + 1) * local]


def iterate_batches(dataset: Dataset, plan: BatchPlan, epoch: int, start_batch: int, workers: int
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(uint8 images, labels, number of skipped corrupt files) per batch, from `start_batch` on."""
    if isinstance(dataset, TensorImages):  # in memory: indexing a tensor beats any worker pool
        for idx in plan.indices(epoch, start_batch):
            images, labels = dataset.batch(idx)
            yield images, labels, 0
        return
    loader = DataLoader(dataset, batch_sampler=[i.tolist() for i in plan.indices(epoch, start_batch)],
                        num_workers=workers, collate_fn=collate_skipping_corrupt, pin_memory=torch.cuda.is_available(),
                        persistent_workers=False)
    yield from loader
