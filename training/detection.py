"""Detection transfer: fine-tune a torchvision detector on a zoo backbone, from a recipe.

    zoo transfer detect training/recipes/detection/voc-faster-rcnn.yaml --set data.root=/data/VOCdevkit
    torchrun --nproc_per_node=8 -m training.detection training/recipes/detection/coco-faster-rcnn.yaml \\
        --set data.root=/data/coco --set model.name=wmse-resnet50.in1k

Recipe sections (`training/recipes/detection/*.yaml`; every number there cites its source):

- `model`: `name` (zoo model), `weights` (`registry`, `untrained`, or a .safetensors / Hub-layout folder),
  `detector` (`faster_rcnn` or `retinanet`), `fpn`, `norm` / `fpn_norm` / `trainable_layers`
  (`zoo.detection_backbone`), `min_size_train` (a list: one is drawn per batch), `min_size_test`, `max_size`.
- `data`: `dataset` (`voc`, `coco` or `synthetic`), `root` (a user path, null in the shipped recipes), the
  splits (`train` / `test`), `workers`. VOC: `root` is the VOCdevkit folder and splits are `VOC2007/trainval`
  style; COCO: `root` holds `<split>/` images and `annotations/instances_<split>.json`; synthetic: generated
  images with coloured boxes (`size`, `test_size`, `image_size`, `num_classes`), for smoke tests.
- `optim`: SGD `lr` for `reference_batch` images, scaled linearly to `batch_size` (the global batch),
  `momentum`, `weight_decay`.
- `schedule`: `max_iter`, `steps` (lr x `gamma` at each), `warmup_iters` / `warmup_factor` (linear warm-up,
  Detectron2's WarmupMultiStepLR).
- `train`: `seed`, `precision` (`fp32`, or `bf16` autocast on CUDA), `log_every`, `checkpoint_every`,
  `eval` (run the test split at the end), `ap` (`voc07`: 11-point, as Detectron2 scores VOC2007 test;
  `area`: all-point; `coco101`: 101-point).

A run folder holds `recipe.yaml` (resolved), `metrics.jsonl` (losses, lr), `checkpoint.pt` (model, optimiser,
iteration; a run restarted with the same folder resumes from it) and `detection_results.json` (AP, AP50,
AP75 in %, with how they were computed). GPU when there is one; torchrun for several. SyncBatchNorm on CPU
becomes plain BatchNorm in one process and `training.sync_bn.GlobalBatchNorm` across gloo processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import yaml
from torch import nn

log = logging.getLogger("training")

SECTIONS = ("model", "data", "optim", "schedule", "train")
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


def load_detection_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from training.recipe import apply_overrides, read_yaml, resolve_recipe_path

    recipe = read_yaml(resolve_recipe_path(path))
    if not isinstance(recipe, dict) or recipe.get("task") != "detection":
        raise ValueError(f"{path} is not a detection recipe (task: detection); see training/recipes/detection/")
    missing = [k for k in SECTIONS if k not in recipe]
    if missing:
        raise ValueError(f"detection recipe {path} lacks section(s) {', '.join(missing)}")
    return apply_overrides(recipe, overrides)


# ------------------------------------------------------------------------------------------ datasets
class DetectionSet(torch.utils.data.Dataset):
    """Items `(image float [3, H, W] in [0, 1], target {"boxes" [K, 4] xyxy, "labels" [K], "ignore" [K]})`.

    Labels are 1..C (0 is the detectors' background). `ignore` marks VOC `difficult` and COCO `iscrowd`
    objects: left out of training targets, neither hit nor miss at evaluation.
    """

    classes: Sequence[str] = ()

    def __init__(self, train: bool):
        self.train = train

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def raw(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def __getitem__(self, i: int):
        image, target = self.raw(i)
        if self.train:
            keep = ~target["ignore"]
            target = {k: v[keep] for k, v in target.items()}
            if torch.rand(()) < 0.5:  # horizontal flip (Detectron2's default training augmentation)
                w = image.shape[-1]
                image = image.flip(-1)
                boxes = target["boxes"].clone()
                boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
                target["boxes"] = boxes
        return image, target


def _read_rgb(path: Path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    with Image.open(path) as im:
        return pil_to_tensor(im.convert("RGB")).float() / 255.0


class VOCDetection(DetectionSet):
    """Pascal VOC from a VOCdevkit folder: `splits` like `["VOC2007/trainval", "VOC2012/trainval"]`."""

    classes = VOC_CLASSES

    def __init__(self, root: str | os.PathLike, splits: Sequence[str], train: bool):
        super().__init__(train)
        root = Path(root)
        self.items: list[tuple[Path, Path]] = []
        for split in splits:
            year, image_set = str(split).split("/")
            listing = root / year / "ImageSets" / "Main" / f"{image_set}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"{listing} not found; set data.root to the VOCdevkit folder holding {year}/")
            for name in listing.read_text().split():
                self.items.append((root / year / "JPEGImages" / f"{name}.jpg", root / year / "Annotations" / f"{name}.xml"))

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int):
        image_path, xml_path = self.items[i]
        boxes, labels, ignore = [], [], []
        for obj in ET.parse(xml_path).findall("object"):
            bb = obj.find("bndbox")
            # Detectron2's VOC loader: 1-based pixel indices to 0-based box corners (x1, y1 minus 1).
            x1, y1, x2, y2 = (float(bb.find(k).text) for k in ("xmin", "ymin", "xmax", "ymax"))
            boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
            labels.append(VOC_CLASSES.index(obj.find("name").text.strip()) + 1)
            difficult = obj.find("difficult")
            ignore.append(difficult is not None and int(difficult.text) == 1)
        return _read_rgb(image_path), _target(boxes, labels, ignore)


class COCODetection(DetectionSet):
    """COCO from `root/<split>/` images and `root/annotations/instances_<split>.json` (no pycocotools needed)."""

    def __init__(self, root: str | os.PathLike, split: str, train: bool):
        super().__init__(train)
        root = Path(root)
        ann = root / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise FileNotFoundError(f"{ann} not found; set data.root to the COCO folder holding annotations/ and {split}/")
        data = json.loads(ann.read_text())
        cats = sorted(c["id"] for c in data["categories"])
        names = {c["id"]: c["name"] for c in data["categories"]}
        self.classes = [names[c] for c in cats]
        self.label_of = {c: i + 1 for i, c in enumerate(cats)}
        per_image: dict[int, list[dict]] = {}
        for a in data["annotations"]:
            per_image.setdefault(a["image_id"], []).append(a)
        images = sorted(data["images"], key=lambda im: im["id"])
        if train:  # Detectron2 drops training images without a usable annotation
            images = [im for im in images if any(not a.get("iscrowd") and a["bbox"][2] >= 1 and a["bbox"][3] >= 1
                                                 for a in per_image.get(im["id"], []))]
        self.items = [(root / split / im["file_name"], per_image.get(im["id"], [])) for im in images]

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int):
        path, anns = self.items[i]
        boxes, labels, ignore = [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            if w < 1 or h < 1:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self.label_of[a["category_id"]])
            ignore.append(bool(a.get("iscrowd")))
        return _read_rgb(path), _target(boxes, labels, ignore)


class SyntheticDetection(DetectionSet):
    """Generated images: 1-3 filled rectangles per image, one colour per class, on faint noise (smoke tests)."""

    def __init__(self, size: int, image_size: int = 96, num_classes: int = 3, seed: int = 0, train: bool = True):
        super().__init__(train)
        self.size, self.image_size, self.seed = int(size), int(image_size), int(seed)
        self.classes = [f"class{k}" for k in range(1, int(num_classes) + 1)]
        self.colours = torch.rand(len(self.classes), 3, generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return self.size

    def raw(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        s = self.image_size
        image = torch.rand(3, s, s, generator=g) * 0.2
        boxes, labels = [], []
        for _ in range(int(torch.randint(1, 4, (), generator=g))):
            w, h = (int(v) for v in torch.randint(s // 6, s // 2, (2,), generator=g))
            x, y = int(torch.randint(0, s - w, (), generator=g)), int(torch.randint(0, s - h, (), generator=g))
            k = int(torch.randint(0, len(self.classes), (), generator=g))
            image[:, y: y + h, x: x + w] = self.colours[k][:, None, None]
            boxes.append([x, y, x + w, y + h])
            labels.append(k + 1)
        return image, _target(boxes, labels, [False] * len(boxes))


def _target(boxes: list, labels: list, ignore: list) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "ignore": torch.tensor(ignore, dtype=torch.bool)}


def build_datasets(data: dict[str, Any], seed: int) -> tuple[DetectionSet, DetectionSet]:
    kind = data.get("dataset")
    if kind == "synthetic":
        common = dict(image_size=data.get("image_size", 96), num_classes=data.get("num_classes", 3))
        return (SyntheticDetection(data.get("size", 64), seed=seed, train=True, **common),
                SyntheticDetection(data.get("test_size", 16), seed=seed + 1, train=False, **common))
    if not data.get("root"):
        raise ValueError(f"data.root is not set: pass the {kind} folder with --set data.root=PATH")
    if kind == "voc":
        return (VOCDetection(data["root"], data["train"], train=True),
                VOCDetection(data["root"], [data["test"]] if isinstance(data["test"], str) else data["test"], False))
    if kind == "coco":
        return COCODetection(data["root"], data["train"], True), COCODetection(data["root"], data["test"], False)
    raise ValueError(f"data.dataset must be voc, coco or synthetic, got {kind!r}")


def collate(batch):
    return tuple(zip(*batch))


# ------------------------------------------------------------------------------------------ model
def build_detector(model_cfg: dict[str, Any], num_classes: int) -> nn.Module:
    """A torchvision detector on `zoo.detection_backbone` (num_classes + 1 outputs: 0 is background)."""
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    from zoo.detection import detection_backbone

    weights = model_cfg.get("weights", "registry")
    pretrained = True if weights == "registry" else False if weights == "untrained" else weights
    kind = model_cfg.get("detector", "faster_rcnn")
    kw = dict(trainable_layers=int(model_cfg.get("trainable_layers", 3)), norm=model_cfg.get("norm", "frozen"),
              pretrained=pretrained, fpn_norm=model_cfg.get("fpn_norm"))
    sizes = dict(min_size=tuple(int(s) for s in model_cfg.get("min_size_train", [800])),
                 max_size=int(model_cfg.get("max_size", 1333)))
    if kind == "faster_rcnn":
        if not model_cfg.get("fpn", True):
            raise ValueError("model.fpn: false needs a C4 RoI head, which torchvision lacks; use fpn: true")
        backbone = detection_backbone(model_cfg["name"], fpn=True, **kw)
        return FasterRCNN(backbone, num_classes=num_classes + 1, **sizes, **backbone.transform_kwargs)
    if kind == "retinanet":  # torchvision's retinanet_resnet50_fpn: P3-P5 from layer2-4, P6/P7 on P5
        backbone = detection_backbone(model_cfg["name"], returned_layers=[2, 3, 4],
                                      extra_blocks=LastLevelP6P7(256, 256), **kw)
        return RetinaNet(backbone, num_classes=num_classes + 1, **sizes, **backbone.transform_kwargs)
    raise ValueError(f"model.detector must be faster_rcnn or retinanet, got {kind!r}")


def _sync_bn_for_device(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if device.type == "cuda":
        return model
    if world > 1:
        from training.sync_bn import convert_global_batchnorm

        return convert_global_batchnorm(model)
    return _plain_batchnorm(model)


def _plain_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm -> BatchNorm2d sharing its tensors (one CPU process: nothing to synchronise)."""
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            bn.weight, bn.bias = module.weight, module.bias
        if module.track_running_stats:
            bn.running_mean, bn.running_var = module.running_mean, module.running_var
            bn.num_batches_tracked = module.num_batches_tracked
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, _plain_batchnorm(child))
    return module


def lr_factor(it: int, steps: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """Detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor`, x gamma at each step passed."""
    factor = gamma ** sum(1 for s in steps if it >= s)
    if it < warmup_iters:
        a = it / warmup_iters
        factor *= warmup_factor * (1 - a) + a
    return factor


# ------------------------------------------------------------------------------------------ evaluation
def _iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import box_iou

    return box_iou(a, b) if len(a) and len(b) else torch.zeros(len(a), len(b))


def _ap(recall: np.ndarray, precision: np.ndarray, kind: str) -> float:
    if kind == "voc07":  # 11-point interpolation
        return float(np.mean([precision[recall >= t].max() if (recall >= t).any() else 0.0
                              for t in np.linspace(0, 1, 11)]))
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
    if kind == "coco101":
        idx = np.searchsorted(mrec, np.linspace(0, 1, 101), side="left")
        return float(np.mean([mpre[i] if i < len(mpre) else 0.0 for i in idx]))
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def detection_ap(detections: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]],
                 num_classes: int, iou_thresholds: Sequence[float] = tuple(np.arange(0.5, 0.96, 0.05)),
                 kind: str = "area") -> dict[str, float]:
    """AP (mean over classes and IoU thresholds 0.5:0.95), AP50 and AP75, in percent.

    VOC's matching (Detectron2's `voc_eval`): detections of a class in score order; the ground truth of
    largest IoU is a hit when IoU >= t and it is not taken yet, ignored when it is `difficult` / crowd,
    else the detection is a false positive. `kind`: `voc07` 11-point, `area` all-point, `coco101`.
    Classes without ground truth are left out of the mean.
    """
    thresholds = [round(float(t), 2) for t in iou_thresholds]
    aps: dict[float, list[float]] = {t: [] for t in thresholds}
    for c in range(1, num_classes + 1):
        n_pos = sum(int(((tg["labels"] == c) & ~tg["ignore"]).sum()) for tg in targets)
        if n_pos == 0:
            continue
        # Per detection: its score, image, best-overlapping ground truth of the class and that IoU
        # (the VOC rule matches against the largest IoU whatever the threshold).
        rows = []
        for i, (d, tg) in enumerate(zip(detections, targets)):
            keep, mask = d["labels"] == c, tg["labels"] == c
            ious = _iou(d["boxes"][keep], tg["boxes"][mask])
            best, arg = ious.max(1) if ious.shape[1] else (torch.zeros(len(ious)), torch.zeros(len(ious), dtype=torch.int64))
            ign = tg["ignore"][mask]
            rows += [(float(sc), i, float(b), int(j), bool(ign[j]) if len(ign) else False)
                     for sc, b, j in zip(d["scores"][keep], best, arg)]
        rows.sort(key=lambda r: -r[0])
        for t in thresholds:
            taken: set[tuple[int, int]] = set()
            tp, fp = [], []
            for _, i, best, j, ignored in rows:
                if best >= t:
                    if ignored:
                        continue
                    hit = (i, j) not in taken
                    taken.add((i, j))
                    tp.append(float(hit))
                    fp.append(float(not hit))
                else:
                    tp.append(0.0)
                    fp.append(1.0)
            if not tp:
                aps[t].append(0.0)
                continue
            tp_c, fp_c = np.cumsum(tp), np.cumsum(fp)
            aps[t].append(_ap(tp_c / n_pos, tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).eps), kind))
    per_threshold = {t: float(np.mean(v)) if v else 0.0 for t, v in aps.items()}
    return {"AP": 100 * float(np.mean(list(per_threshold.values()))), "AP50": 100 * per_threshold.get(0.5, math.nan),
            "AP75": 100 * per_threshold.get(0.75, math.nan)}


@torch.no_grad()
def evaluate_detector(model: nn.Module, dataset: DetectionSet, device: torch.device, min_size_test: int | None,
                      kind: str, batch_size: int = 4, workers: int = 0, limit: int | None = None) -> dict[str, float]:
    was = model.training
    model.eval()
    transform = model.transform
    old = transform.min_size
    if min_size_test is not None:
        transform.min_size = (int(min_size_test),)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate)
    dets, tgts = [], []
    try:
        for images, targets in loader:
            out = model([im.to(device) for im in images])
            dets += [{k: v.cpu() for k, v in o.items()} for o in out]
            tgts += list(targets)
    finally:
        transform.min_size = old
        model.train(was)
    return detection_ap(dets, tgts, dataset.num_classes, kind=kind)


# ------------------------------------------------------------------------------------------ runner
def _dist() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def run_detection(recipe_path: str | os.PathLike | dict, overrides: Iterable[str] = (), out: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train (and evaluate) a recipe; returns `{"out", "steps", "loss", "losses", "metrics"}`."""
    import torch.distributed as dist

    recipe = (load_detection_recipe(recipe_path, overrides) if not isinstance(recipe_path, dict)
              else recipe_path)
    name = Path(str(recipe_path)).stem if not isinstance(recipe_path, dict) else "recipe"
    out = Path(out or f"runs/detect-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    m, d, o, s, t = (recipe[k] for k in SECTIONS)
    rank, world, local_rank = _dist()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    seed = int(t.get("seed", 0))
    torch.manual_seed(seed + rank)
    train_set, test_set = build_datasets(d, seed)
    model = _sync_bn_for_device(build_detector(m, train_set.num_classes), device, world).to(device)
    batch = int(o.get("batch_size", 16))
    if batch % world:
        raise ValueError(f"optim.batch_size {batch} must divide over {world} processes")
    lr = float(o["lr"]) * batch / float(o.get("reference_batch", batch))  # linear scaling rule
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=float(o.get("momentum", 0.9)),
                          weight_decay=float(o.get("weight_decay", 1e-4)))
    max_iter = int(s["max_iter"])
    steps = [int(x) for x in s.get("steps", [])]
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iter"])
        log.info("resuming %s at iteration %d", out, start)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    net = nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if device.type == "cuda" else None) \
        if world > 1 else model
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=seed) if world > 1 \
        else torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch // world, sampler=sampler, drop_last=True,
                                         num_workers=int(d.get("workers", 0)), collate_fn=collate)
    if len(loader) == 0:
        raise ValueError(f"the training split has {len(train_set)} images, fewer than a batch of {batch // world}")
    precision = t.get("precision", "fp32")
    autocast = precision == "bf16" and device.type == "cuda"
    log_every, ckpt_every = int(t.get("log_every", 20)), int(t.get("checkpoint_every", 2000))
    it, epoch, losses = start, 0, []
    model.train()
    from tqdm.auto import tqdm

    def save() -> None:
        if rank == 0:
            tmp = out / ".checkpoint.pt.tmp"
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it}, tmp)
            os.replace(tmp, ckpt_path)

    with tqdm(total=max_iter, initial=start, desc="detect", unit="it", disable=not progress or rank != 0,
              file=sys.stderr) as bar, open(out / "metrics.jsonl", "a") if rank == 0 else _null() as metrics:
        while it < max_iter:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            for images, targets in loader:
                if it >= max_iter:
                    break
                factor = lr_factor(it, steps, float(s.get("gamma", 0.1)), int(s.get("warmup_iters", 0)),
                                   float(s.get("warmup_factor", 0.001)))
                for g in opt.param_groups:
                    g["lr"] = lr * factor
                images = [im.to(device, non_blocking=True) for im in images]
                targets = [{k: v.to(device) for k, v in tg.items() if k != "ignore"} for tg in targets]
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss_dict = net(images, targets)
                loss = sum(loss_dict.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"detection loss is {loss.item()} at iteration {it + 1} "
                                             f"({ {k: float(v) for k, v in loss_dict.items()} }); lower optim.lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                it += 1
                losses.append(loss.item())
                bar.update(1)
                if rank == 0 and (it % log_every == 0 or it == max_iter):
                    metrics.write(json.dumps({"iter": it, "loss": losses[-1], "lr": lr * factor,
                                              **{k: v.item() for k, v in loss_dict.items()}}) + "\n")
                    metrics.flush()
                if it % ckpt_every == 0:
                    save()
            epoch += 1
    save()
    results = {}
    if t.get("eval", True) and rank == 0:
        results = evaluate_detector(model, test_set, device, m.get("min_size_test"), t.get("ap", "area"),
                                    workers=int(d.get("workers", 0)), limit=t.get("eval_limit"))
        how = (f"{t.get('ap', 'area')} AP over IoU 0.50:0.95, VOC-style matching (zoo training/detection.py), "
               f"{min(len(test_set), t.get('eval_limit') or len(test_set))} test images of {d.get('dataset')}"
               f", min side {m.get('min_size_test')}")
        (out / "detection_results.json").write_text(json.dumps({**{k: round(v, 2) for k, v in results.items()},
                                                                "protocol": how, "iterations": it}, indent=2) + "\n")
    if world > 1:
        dist.barrier()
    return {"out": str(out), "steps": it, "loss": losses[-1] if losses else math.nan, "losses": losses,
            "metrics": results}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.detection", description=__doc__.split("\n")[0])
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    final = run_detection(args.recipe, args.set, args.out, progress=not args.no_progress)
    print(f"run {final['out']}: {final['steps']} steps, last loss {final['loss']:.4f}"
          + "".join(f", {k} {v:.2f}" for k, v in final["metrics"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
