"""Detection AP as Detectron2 scores VOC (11-point, all-point) and COCO's 101-point variant, without pycocotools."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from training.detection_data import DetectionSet, collate


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
