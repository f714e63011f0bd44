"""Detection datasets: Pascal VOC, COCO (no pycocotools needed) and synthetic boxes, as one item format.

Items are `(image float [3, H, W] in [0, 1], target {"boxes" [K, 4] xyxy, "labels" [K], "ignore" [K]})`;
`build_datasets` picks them from a detection recipe's `data` section (training/detection.py).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Sequence

import torch

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")


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


def collate(batch: Sequence[Any]) -> tuple:
    return tuple(zip(*batch))
