"""Standardisation constants for EquiMod's augmentation-parameter vectors on a new dataset.

The authors hard-code per-dataset mean/std vectors (CIFAR-10, ImageNet). For any other dataset we
measure them the same way the constants behave: draw the recipe's augmentations for N training
images (its own seed) and take the per-dimension mean and std of the raw vectors over both views.
A constant dimension (std 0, e.g. a probability-0 solarize flag) gets std 1 so it standardises to 0.

    python -m training.param_stats training/recipes/equimod-simclr/fmnist.yaml [--images 20000]
"""

from __future__ import annotations

import argparse

import torch

from training.augment import build_augment
from training.data import build_dataset
from training.recipe import load_recipe
from zoo.registry import get_dataset


def measure_param_stats(recipe: dict, n_images: int = 20000, seed: int = 0) -> tuple[list[float], list[float]]:
    data = recipe["data"]
    row = get_dataset(data["dataset"])
    augment = build_augment(recipe["augment"], row.mean, row.std)
    if augment.param_groups is None:
        raise ValueError("the recipe's augment section has no `params:` groups; nothing to measure")
    dataset = build_dataset(data, "train")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n_images]
    params = []
    for k, chunk in enumerate(idx.split(1024)):
        images = dataset.batch(chunk)[0] if hasattr(dataset, "batch") else torch.stack([dataset[int(i)][0] for i in chunk])
        params.extend(augment(images, torch.Generator().manual_seed(seed * 7919 + k)).params)
    p = torch.cat(params).double()
    mean, std = p.mean(0), p.std(0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return [round(float(v), 5) for v in mean], [round(float(v), 5) for v in std]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--images", type=int, default=20000)
    args = parser.parse_args()
    mean, std = measure_param_stats(load_recipe(args.recipe), args.images)
    print(f"  param_mean: {mean}\n  param_std: {std}")


if __name__ == "__main__":
    main()
