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

Here: the recipe, the detector, and the training loop; the datasets are training/detection_data.py and
the AP evaluation training/detection_eval.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import yaml
from torch import nn

from training.detection_data import build_datasets, collate
from training.detection_eval import evaluate_detector
from zoo import distributed as zoo_dist
from zoo.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint

log = logging.getLogger("training")

SECTIONS = ("model", "data", "optim", "schedule", "train")


def load_detection_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    from training.recipe import apply_overrides, read_yaml, resolve_recipe_path

    recipe = read_yaml(resolve_recipe_path(path))
    if not isinstance(recipe, dict) or recipe.get("task") != "detection":
        raise ValueError(f"{path} is not a detection recipe (task: detection); see training/recipes/detection/")
    missing = [k for k in SECTIONS if k not in recipe]
    if missing:
        raise ValueError(f"detection recipe {path} lacks section(s) {', '.join(missing)}")
    return apply_overrides(recipe, overrides)


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
    from training.sync_bn import replace_batchnorm

    return replace_batchnorm(module, nn.SyncBatchNorm, nn.BatchNorm2d)


def lr_factor(it: int, steps: Sequence[int], gamma: float, warmup_iters: int, warmup_factor: float) -> float:
    """Detectron2's WarmupMultiStepLR: linear warm-up from `warmup_factor`, x gamma at each step passed."""
    factor = gamma ** sum(1 for s in steps if it >= s)
    if it < warmup_iters:
        a = it / warmup_iters
        factor *= warmup_factor * (1 - a) + a
    return factor


# ------------------------------------------------------------------------------------------ runner
def run_detection(recipe_path: str | os.PathLike | dict, overrides: Iterable[str] = (), out: str | os.PathLike | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """Train (and evaluate) a recipe; returns `{"out", "steps", "loss", "losses", "metrics"}`."""
    import torch.distributed as dist

    recipe = (load_detection_recipe(recipe_path, overrides) if not isinstance(recipe_path, dict)
              else recipe_path)
    name = Path(str(recipe_path)).stem if not isinstance(recipe_path, dict) else "recipe"
    out = Path(out or f"runs/detect-{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    m, d, o, s, t = (recipe[k] for k in SECTIONS)
    device = zoo_dist.init_from_env()
    rank, world = zoo_dist.rank(), zoo_dist.world_size()
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
    ckpt_path = out / CHECKPOINT_FILE
    if ckpt_path.exists():
        state = load_checkpoint(ckpt_path, map_location=device, hint="delete it or pass another --out to start again")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iter"])
        log.info("resuming %s at iteration %d", out, start)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
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

    def save() -> None:  # the detection kind of checkpoint.pt (zoo.checkpoint's docstring lists its keys)
        if rank == 0:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": it}, ckpt_path)

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
        how = (f"{t.get('ap', 'area')} AP over IoU 0.50:0.95, VOC-style matching (zoo training/detection_eval.py), "
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
