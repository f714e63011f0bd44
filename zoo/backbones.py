"""Backbones: torchvision ResNets with the classifier removed, returning pooled features.

An arch is a row of data (`ArchSpec`), not a class: the torchvision constructor, the stem, the
width. Every backbone takes 3-channel input; a 1-channel (grayscale) batch is repeated to 3
channels inside `forward`, and `zoo.preprocess` does the same for PIL images and tensors, so
ImageNet-stem weights and Fashion-MNIST weights share one input convention.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, ResNet

from zoo.errors import UnknownNameError, closest


@dataclass(frozen=True)
class ArchSpec:
    name: str
    feature_dim: int
    builder: Callable[..., ResNet]
    small_stem: bool  # 3x3 first conv instead of 7x7 stride 2, as the SSL papers use for 32-96 px images
    maxpool: bool
    description: str
    stem_stride: int = 1


def _narrow_resnet18(weights=None, **kwargs) -> ResNet:
    """ResNet-18 topology with base width 32 (channels 32-64-128-256).

    Sized for two CPU cores. Measured here (fp32, batch 512, 28 px, fwd+bwd+SGD): 264 views/s with
    a stride-1 stem against 883 views/s with the stride-2 stem it ships with, so an epoch of
    Fashion-MNIST (2 x 60k views) takes ~2.3 min and a recipe gets 10+ epochs in 30 minutes.
    """
    model = ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)
    width = 32
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    model.layer1 = model._make_layer(BasicBlock, width, 2)
    model.layer2 = model._make_layer(BasicBlock, width * 2, 2, stride=2)
    model.layer3 = model._make_layer(BasicBlock, width * 4, 2, stride=2)
    model.layer4 = model._make_layer(BasicBlock, width * 8, 2, stride=2)
    for m in model.modules():  # torchvision's init, repeated for the rebuilt layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if kwargs.get("zero_init_residual"):
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    return model


ARCHS: dict[str, ArchSpec] = {
    a.name: a
    for a in [
        ArchSpec("resnet18", 512, tvm.resnet18, False, True, "torchvision ResNet-18, ImageNet stem"),
        ArchSpec("resnet50", 2048, tvm.resnet50, False, True, "torchvision ResNet-50, ImageNet stem"),
        ArchSpec("resnet18_cifar", 512, tvm.resnet18, True, False,
                 "ResNet-18 with 3x3 stride-1 stem, no max-pool (CIFAR variant of the SSL papers)"),
        ArchSpec("resnet50_cifar", 2048, tvm.resnet50, True, False,
                 "ResNet-50 with 3x3 stride-1 stem, no max-pool"),
        ArchSpec("resnet18_stl", 512, tvm.resnet18, True, True,
                 "ResNet-18 with 3x3 stride-1 stem and max-pool (W-MSE's STL-10 / Tiny ImageNet variant)"),
        ArchSpec("resnet18_narrow", 256, _narrow_resnet18, True, False,
                 "ResNet-18 layout, width 32, 3x3 stride-2 stem, no max-pool: the CPU arch for Fashion-MNIST "
                 "on 2 cores (28 px -> maps of 14, 7, 4, 2)", stem_stride=2),
    ]
}


def as_three_channels(x: torch.Tensor) -> torch.Tensor:
    """Check a batch `[N, 1 or 3, H, W]`; grayscale is repeated to the 3 channels every stem takes."""
    if x.dim() != 4:
        raise ValueError(f"expected a batch [N, C, H, W], got shape {tuple(x.shape)}; add a batch dim with x[None]")
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    return x


class Backbone(nn.Module):
    """A ResNet trunk mapping `[N, 3 or 1, H, W]` images to pooled features `[N, feature_dim]`.

    The trunk's children keep torchvision's names (`conv1`, `bn1`, `layer1`...), so a plain
    torchvision state dict without `fc.*` loads directly into `Backbone.trunk`'s layout.
    """

    def __init__(self, arch: str, zero_init_residual: bool = False):
        super().__init__()
        spec = get_arch(arch)
        trunk = spec.builder(weights=None, zero_init_residual=zero_init_residual)
        if spec.small_stem:
            trunk.conv1 = nn.Conv2d(3, trunk.conv1.out_channels, kernel_size=3, stride=spec.stem_stride, padding=1,
                                    bias=False)
            nn.init.kaiming_normal_(trunk.conv1.weight, mode="fan_out", nonlinearity="relu")
        if not spec.maxpool:
            trunk.maxpool = nn.Identity()
        trunk.fc = nn.Identity()
        # Registered under the torchvision names directly (no wrapper prefix in the state dict).
        for name, child in trunk.named_children():
            self.add_module(name, child)
        self.arch = arch
        self.feature_dim = spec.feature_dim

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map `[N, C, h, w]` before pooling."""
        x = as_three_channels(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.avgpool(self.forward_features(x)), 1)


def get_arch(arch: str) -> ArchSpec:
    if arch not in ARCHS:
        raise UnknownNameError(f"unknown arch {arch!r}; did you mean {closest(arch, ARCHS)}? "
                               f"Known archs: {', '.join(ARCHS)}")
    return ARCHS[arch]


def create_backbone(arch: str, zero_init_residual: bool = False) -> Backbone:
    """An untrained backbone of the given arch (see `ARCHS`)."""
    return Backbone(arch, zero_init_residual=zero_init_residual)
