"""Label-efficient transfer: linear probe and fine-tuning on class-balanced subsets of the labels.

    zoo eval linear   wmse-resnet18_narrow.fmnist --dataset fmnist --labels 1% 10%
    zoo eval finetune wmse-resnet18_narrow.fmnist --labels 10% --results runs/.../results.json
    zoo eval finetune MODEL --train my/train --val my/val --labels 10%          # any ImageFolder

Subsets (`balanced_subset`): the same number of images per class, round(fraction x N / classes)
(at least 1; a class with fewer images gives all it has), drawn with numpy's PCG64 seeded by
`(seed, class)`: deterministic for a seed (default 0), independent between classes, and nested (the
1% subset of a seed lies inside its 10% subset). 100% is the whole training split.

Protocols (the text stored beside each number is `protocol_text`):

- `linear_<p>pct`: `zoo.eval.linear_probe_accuracy` (the cards' linear probe: standardised frozen
  features, L-BFGS, 100 iterations, weight decay 5e-4) trained on the subset, top-1 on the whole test split.
- `finetune_<p>pct`: the whole network plus a zero-initialised linear head trained end-to-end on the
  subset: SGD with Nesterov momentum 0.9, lr 0.05 x batch / 256 with cosine decay to 0 per step, no
  weight decay (SimCLR's semi-supervised fine-tuning optimiser), BatchNorm in train mode, random
  horizontal flips and random crops (padding 1/8 of the side, reflected) of the evaluation view;
  CPU-sized defaults: 1 epoch, batch 256, fp32. Top-1 on the whole test split in eval mode.

Results merge into the CLI's `results.json` (`--results`): each key plus `transfer_protocols[key]`;
`zoo export` shows them in the model card beside k-NN.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ZooError

log = logging.getLogger("zoo")

LABEL_SEED = 0
FINETUNE_EPOCHS = 1
FINETUNE_BATCH = 256
FINETUNE_BASE_LR = 0.05  # per 256 images (SimCLR appendix B.5: 0.05 x BatchSize / 256, Nesterov momentum 0.9)
FINETUNE_MOMENTUM = 0.9


class TransferError(ZooError, ValueError):
    """Bad arguments or data for a transfer evaluation (one line, names the fix)."""


# ------------------------------------------------------------------------------------------ label subsets
def parse_labels(text: str | float) -> float:
    """`"1%"` -> 0.01, `"10%"` -> 0.1, `"100%"` -> 1.0 (a bare number is a percentage too)."""
    raw = str(text).strip()
    try:
        pct = float(raw[:-1] if raw.endswith("%") else raw)
    except ValueError:
        raise TransferError(f"--labels takes a percentage such as 1%, 10% or 100%, got {text!r}") from None
    if not 0 < pct <= 100 or not math.isfinite(pct):
        raise TransferError(f"--labels must be a percentage in (0, 100], got {text!r}")
    return pct / 100.0


def labels_key(fraction: float) -> str:
    """`0.01` -> `1pct`, `0.1` -> `10pct`, `1.0` -> `100pct`, `0.005` -> `0p5pct` (results.json key suffix)."""
    pct = round(fraction * 100, 6)
    return f"{pct:g}".replace(".", "p") + "pct"


def balanced_subset(labels: Sequence[int] | torch.Tensor | np.ndarray, fraction: float, seed: int = LABEL_SEED
                    ) -> torch.Tensor:
    """Sorted indices of a class-balanced subset: round(fraction x N / classes) per class (see module docstring)."""
    y = np.asarray(torch.as_tensor(labels).cpu().numpy() if torch.is_tensor(labels) else labels).astype(np.int64)
    if y.ndim != 1 or y.size == 0:
        raise TransferError(f"labels must be a non-empty 1-D sequence, got shape {y.shape}")
    if not 0 < fraction <= 1:
        raise TransferError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return torch.arange(y.size, dtype=torch.int64)
    classes = np.unique(y)
    per_class = max(1, int(round(fraction * y.size / classes.size)))
    chosen, short = [], []
    for c in classes:
        members = np.flatnonzero(y == c)
        order = np.random.default_rng([int(seed), int(c)]).permutation(members.size)
        if members.size < per_class:
            short.append(int(c))
        chosen.append(members[order[:per_class]])
    if short:
        log.warning("class(es) %s have fewer than %d images: the subset takes all of theirs", short, per_class)
    return torch.from_numpy(np.sort(np.concatenate(chosen)))


# ------------------------------------------------------------------------------------------ data
@dataclass
class LabelledSplit:
    """A labelled split: Fashion-MNIST tensors, or an ImageFolder's files (`items` paths)."""

    name: str
    labels: torch.Tensor
    images: torch.Tensor | None = None  # uint8 [N, H, W] / [N, C, H, W]
    paths: list[str] | None = None
    classes: list[str] | None = None

    def __len__(self) -> int:
        return int(self.labels.numel())

    @classmethod
    def of(cls, data: Any) -> "LabelledSplit":
        """An in-memory labelled split (`zoo.datasets.fashion_mnist_split`: name, images, labels, classes)."""
        return cls(data.name, data.labels, data.images, classes=data.classes)

    def take(self, indices: torch.Tensor) -> "LabelledSplit":
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return LabelledSplit(self.name, self.labels[idx], None if self.images is None else self.images[idx],
                             None if self.paths is None else [self.paths[i] for i in idx.tolist()], self.classes)


class _PathDataset(torch.utils.data.Dataset):
    """(path, label) items: `zoo.embed` decodes the paths (unreadable files reported, not fatal)."""

    def __init__(self, split: LabelledSplit):
        self.paths, self.labels = split.paths, split.labels.tolist()
        self.ids = list(self.paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.paths[i], self.labels[i]


def image_folder(root: str | os.PathLike, classes: list[str] | None = None, name: str | None = None) -> LabelledSplit:
    """An ImageFolder (`root/<class>/<image>`, recursive): paths and labels, classes sorted by name.

    `classes` (the training split's) makes a validation folder use the same label numbers; a class
    folder the training split lacks is an error.
    """
    from zoo.images import list_images

    root = Path(root)
    if not root.is_dir():
        raise TransferError(f"{root} is not a folder; pass an ImageFolder (one sub-folder of images per class)")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise TransferError(f"{root} has no class sub-folders; lay it out as {root}/<class>/<image>")
    if classes is not None:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise TransferError(f"{root} has class folder(s) {extra[:5]} the training folder lacks; the splits must "
                                f"share their classes")
    classes = list(classes) if classes is not None else found
    paths, labels = [], []
    for c in found:
        files = list_images(root / c)
        paths += files
        labels += [classes.index(c)] * len(files)
    if not paths:
        raise TransferError(f"{root} holds no image files")
    return LabelledSplit(name or str(root), torch.tensor(labels, dtype=torch.int64), paths=paths, classes=classes)


def _features(model: nn.Module, split: LabelledSplit, batch_size: int | None, backend: str, precision: str,
              progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (unnormalised) features and labels of the images that could be read."""
    from zoo.embed import embed

    kw = dict(batch_size=batch_size, backend=backend, precision=precision, normalize=False, progress=progress)
    if split.images is not None:
        emb = embed(model, split.images, **kw)
        return emb.features, split.labels[torch.as_tensor(emb.ids, dtype=torch.int64)]
    emb = embed(model, _PathDataset(split), **kw)
    if emb.failed:
        log.warning("%s: %d unreadable image(s) skipped (first: %s)", split.name, len(emb.failed), emb.failed[0])
    labels = dict(zip(split.paths, split.labels.tolist()))
    return emb.features, torch.tensor([labels[i] for i in emb.ids], dtype=torch.int64)


# ------------------------------------------------------------------------------------------ protocols
def linear_transfer(model: nn.Module, train: LabelledSplit, test: LabelledSplit, fraction: float,
                    seed: int = LABEL_SEED, batch_size: int | None = None, backend: str = "torch",
                    precision: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """Linear probe on a class-balanced `fraction` of `train`, top-1 (%) on all of `test`."""
    from zoo.eval import linear_probe_accuracy

    subset = balanced_subset(train.labels, fraction, seed)
    train_f, train_y = _features(model, train.take(subset), batch_size, backend, precision, progress)
    test_f, test_y = _features(model, test, batch_size, backend, precision, progress)
    acc = linear_probe_accuracy(train_f, train_y, test_f, test_y)
    return {"key": f"linear_{labels_key(fraction)}", "top1": acc, "n_train": int(len(train_y)),
            "n_test": int(len(test_y)), "fraction": fraction, "seed": seed}


def pixel_linear_transfer(train: LabelledSplit, test: LabelledSplit, fraction: float, seed: int = LABEL_SEED
                          ) -> dict[str, Any]:
    """The raw-pixel baseline of `linear_transfer`: the same subset and probe on standardised pixels."""
    from zoo.eval import linear_probe_accuracy, pixel_features

    if train.images is None or test.images is None:
        raise TransferError("the raw-pixel baseline needs images of one size in memory (--dataset fmnist); "
                            "name a model for --train/--val ImageFolders")
    subset = balanced_subset(train.labels, fraction, seed)
    train_f, test_f = pixel_features(train.images[subset], test.images)  # standardised with the subset's statistics
    acc = linear_probe_accuracy(train_f, train.labels[subset], test_f, test.labels)
    return {"key": f"linear_{labels_key(fraction)}", "top1": acc, "n_train": int(len(subset)),
            "n_test": int(len(test.labels)), "fraction": fraction, "seed": seed}


class _Batches:
    """Preprocessed `[B, 3, S, S]` batches of a split (vectorised for tensors, decoded per file for paths)."""

    def __init__(self, split: LabelledSplit, preprocess: Any):
        self.split, self.preprocess = split, preprocess
        self.skipped = 0

    def get(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.split.images is not None:
            x = self.split.images[idx]
            return self.preprocess(x[:, None] if x.dim() == 3 else x), self.split.labels[idx]
        from zoo.images import UnreadableImage, read_image

        xs, ys = [], []
        for i in idx:
            try:
                xs.append(self.preprocess(read_image(self.split.paths[i])))
                ys.append(int(self.split.labels[i]))
            except UnreadableImage as e:
                self.skipped += 1
                log.warning("skipped %s: %s", self.split.paths[i], e)
        if not xs:
            return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.int64)
        return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and random crop (reflect padding of 1/8 of the side) per image."""
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(n)])


class _Classifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.feature_dim), num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def finetune_transfer(model: nn.Module, train: LabelledSplit, test: LabelledSplit, fraction: float,
                      seed: int = LABEL_SEED, epochs: int = FINETUNE_EPOCHS, batch_size: int = FINETUNE_BATCH,
                      lr: float | None = None, progress: bool = False, max_steps: int | None = None
                      ) -> dict[str, Any]:
    """Fine-tune a copy of `model` (whole network + linear head) on a class-balanced `fraction` of `train`.

    The caller's model is left untouched. Returns top-1 (%) on all of `test` and the protocol's numbers.
    `max_steps` stops early (smoke tests).
    """
    from tqdm.auto import tqdm

    if epochs < 1 or batch_size < 2:
        raise TransferError(f"epochs must be >= 1 and batch_size >= 2, got {epochs} and {batch_size}")
    subset = balanced_subset(train.labels, fraction, seed)
    part = train.take(subset)
    num_classes = int(max(int(train.labels.max()), int(test.labels.max()))) + 1
    preprocess = model.preprocess
    device = next(model.parameters()).device
    from zoo.backbones import create_backbone

    backbone = create_backbone(model.arch)  # a fresh copy of the weights: the caller's model is untouched
    backbone.load_state_dict(model.state_dict())
    net = _Classifier(backbone, num_classes).to(device).train()
    lr = FINETUNE_BASE_LR * batch_size / 256 if lr is None else float(lr)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=FINETUNE_MOMENTUM, nesterov=True, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed))
    steps_per_epoch = max(1, math.ceil(len(part) / batch_size))
    total = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    data = _Batches(part, preprocess)
    step, losses = 0, []
    with tqdm(total=total, desc="finetune", unit="step", disable=not progress, file=sys.stderr) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(part), generator=gen).tolist()
            for s in range(0, len(order), batch_size):
                if step >= total:
                    break
                x, y = data.get(order[s: s + batch_size])
                if len(y) < 2:  # BatchNorm needs two images in train mode
                    continue
                x = _augment(x, gen).to(device)
                loss = F.cross_entropy(net(x), y.to(device))
                if not torch.isfinite(loss):
                    raise TransferError(f"fine-tuning diverged at step {step + 1} (loss {loss.item()}); pass a "
                                        f"smaller --lr (now {lr:g})")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
                bar.update(1)
    net.eval()
    correct = seen = 0
    test_data = _Batches(test, preprocess)
    with torch.no_grad():
        for s in range(0, len(test), 512):
            x, y = test_data.get(list(range(s, min(s + 512, len(test)))))
            if len(y):
                correct += int((net(x.to(device)).argmax(1).cpu() == y).sum())
                seen += len(y)
    return {"key": f"finetune_{labels_key(fraction)}", "top1": 100.0 * correct / max(seen, 1), "n_train": len(part),
            "n_test": seen, "fraction": fraction, "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "steps": step, "final_loss": losses[-1] if losses else None}


def protocol_text(result: dict[str, Any], dataset: str) -> str:
    """One paragraph naming everything a reader needs to reproduce a transfer number."""
    pct = f"{result['fraction'] * 100:g}%"
    subset = (f"{pct} of the training labels, class-balanced ({result['n_train']} images, the same count per "
              f"class, numpy PCG64 seeded by (seed {result['seed']}, class))" if result["fraction"] < 1
              else f"all training labels ({result['n_train']} images)")
    if result["key"].startswith("linear"):
        how = ("linear probe on frozen features (standardised, L-BFGS, 100 iterations, weight decay 5e-4, "
               "zoo.eval.linear_probe_accuracy)")
    else:
        how = (f"fine-tuning of the whole network plus a zero-initialised linear head, {result['epochs']} epoch(s) = "
               f"{result['steps']} steps, batch {result['batch_size']}, SGD Nesterov momentum 0.9, lr "
               f"{result['lr']:g} cosine-decayed per step, no weight decay, random flip + padded random crop, "
               f"BatchNorm in train mode (zoo.transfer.finetune_transfer)")
    return f"{dataset}: {how}, trained on {subset}; top-1 on the {result['n_test']} test images."


def merge_results(path: str | os.PathLike, results: Sequence[dict[str, Any]], dataset: str) -> Path:
    """Merge transfer numbers into a results.json (keys + `transfer_protocols`), keeping everything else."""
    from zoo.checkpoint import update_results

    return update_results(path, {r["key"]: r["top1"] for r in results},
                          {r["key"]: protocol_text(r, dataset) for r in results})
