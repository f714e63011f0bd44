"""Detection and segmentation backbones for torchvision's detectors and segmenters.

    backbone = zoo.detection_backbone("wmse-resnet50.in1k")              # BackboneWithFPN, out_channels 256
    model = torchvision.models.detection.FasterRCNN(backbone, num_classes=21, **backbone.transform_kwargs)

    body = zoo.segmentation_backbone("wmse-resnet50.in1k", aux=True)   # {'out': layer4, 'aux': layer3}
    model = DeepLabV3(body, DeepLabHead(body.out_channels, 21), FCNHead(body.aux_channels, 21))

`detection_backbone` is torchvision's own `_resnet_fpn_extractor` (so `BackboneWithFPN`, FPN on
layer1-4 plus a max-pooled P6, as `fasterrcnn_resnet50_fpn`) over a zoo backbone with its weights:

- `norm="frozen"` (default, torchvision's and Detectron2's choice for fine-tuning): every BatchNorm
  becomes `torchvision.ops.misc.FrozenBatchNorm2d` holding the pretrained statistics and affine terms;
  `"sync"`: `nn.SyncBatchNorm` (MoCo's detection transfer tunes BN this way; a single process runs
  it as plain BatchNorm); `"bn"`: plain BatchNorm, statistics updated in train mode.
- `trainable_layers` (0-5, default 3) leaves `layer4`, `layer3`, ... trainable counted from the top,
  as torchvision: 5 also trains the stem (`conv1`, `bn1`); the rest has `requires_grad=False`.
- `fpn=False` returns the single map of the last of `returned_layers` (default layer4) as `{"0": map}`;
  give the detector an anchor generator and RoI pooler for one map (torchvision's MobileNet example).

The detectors normalise images themselves: `backbone.transform_kwargs` holds the model's
`image_mean` / `image_std` for `FasterRCNN`, `MaskRCNN` or `RetinaNet` (ImageNet values for the
ImageNet-pretrained rows, the pretraining dataset's otherwise). Inputs are 3-channel images.

`segmentation_backbone` dilates the last stages instead of striding them (torchvision's
`replace_stride_with_dilation=[False, True, True]`, output stride 8 on the ImageNet stem) and returns
torchvision's `IntermediateLayerGetter` with `out` (layer4) and, with `aux=True`, `aux` (layer3), as
`FCN` and `DeepLabV3` expect. A Bottleneck's 3x3 convolution takes the dilation exactly as torchvision
builds it; in a BasicBlock (ResNet-18 archs, which torchvision cannot dilate) its strided first
convolution does (MMSegmentation's choice).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

NORMS = ("frozen", "sync", "bn")


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a `FrozenBatchNorm2d` with its statistics and affine terms (in place)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, FrozenBatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats and module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        source = next(iter(module.buffers()), None) if module.running_mean is None else module.running_mean
        return frozen.to(source.device) if source is not None else frozen
    for name, child in module.named_children():
        module.add_module(name, freeze_batchnorm(child))
    return module


def convert_norm(module: nn.Module, norm: str) -> nn.Module:
    """`frozen` -> FrozenBatchNorm2d, `sync` -> nn.SyncBatchNorm, `bn` -> unchanged."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if norm == "frozen":
        return freeze_batchnorm(module)
    if norm == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def _strided_conv(block: nn.Module) -> nn.Conv2d:
    """The 3x3 convolution that carries a block's stride: conv2 of a Bottleneck, conv1 of a BasicBlock."""
    return block.conv2 if hasattr(block, "conv3") else block.conv1


def dilate_stages(backbone: nn.Module, replace_stride_with_dilation: Sequence[bool] = (False, True, True)
                  ) -> nn.Module:
    """Turn the strides of layer2-4 (one flag each) into dilations, in place, as torchvision's `_make_layer`.

    The first block of a dilated stage keeps the previous dilation and loses its stride (its shortcut
    too); the following blocks take the new dilation. Weights are unchanged (same shapes).
    """
    flags = tuple(bool(f) for f in replace_stride_with_dilation)
    if len(flags) != 3:
        raise ValueError(f"replace_stride_with_dilation needs 3 flags (layer2, layer3, layer4), got {flags}")
    dilation = 1
    for i, flag in zip((2, 3, 4), flags):
        blocks = list(getattr(backbone, f"layer{i}").children())
        previous = dilation
        if flag:
            first = blocks[0]
            dilation *= int(first.stride)
            first.stride = 1
            _strided_conv(first).stride = (1, 1)
            if first.downsample is not None:
                first.downsample[0].stride = (1, 1)
        for j, block in enumerate(blocks):
            d = previous if j == 0 else dilation
            conv = _strided_conv(block)
            conv.dilation, conv.padding = (d, d), (d, d)
    return backbone


def _zoo_backbone(name: str, pretrained: bool | str | os.PathLike, revision: str | None) -> nn.Module:
    from zoo.load import load

    model = load(name, pretrained=pretrained, device="cpu", revision=revision)
    model.inplanes = _last_channels(model)  # what torchvision's extractor reads the FPN widths from
    return model


def _last_channels(model: nn.Module) -> int:
    from zoo.features import stage_info

    return stage_info(model)[-1]["num_chs"]


def _check_trainable(trainable_layers: int) -> None:
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= 5:
        raise ValueError(f"trainable_layers must be 0-5 (layers trained from layer4 down; 5 adds the stem), "
                         f"got {trainable_layers!r}")


def _freeze_layers(model: nn.Module, trainable_layers: int) -> None:
    """torchvision's rule (`_resnet_fpn_extractor`): train layer4, layer3, ... then conv1 and bn1 at 5."""
    train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, p in model.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            p.requires_grad_(False)


class SingleMapBackbone(nn.Module):
    """One stage's map as `{"0": map}` with `out_channels`, for detectors without an FPN."""

    def __init__(self, backbone: nn.Module, layer: int):
        super().__init__()
        self.body = IntermediateLayerGetter(backbone, return_layers={f"layer{layer}": "0"})
        from zoo.features import stage_info

        self.out_channels = stage_info(backbone)[layer]["num_chs"]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.body(x)


def _attach(module: nn.Module, spec: Any) -> nn.Module:
    module.spec = spec
    module.transform_kwargs = {"image_mean": list(spec.mean), "image_std": list(spec.std)}
    return module


def detection_backbone(name: str, trainable_layers: int = 3, norm: str = "frozen", fpn: bool = True,
                       pretrained: bool | str | os.PathLike = True, returned_layers: Sequence[int] | None = None,
                       extra_blocks: nn.Module | None = None, fpn_norm: str | None = None,
                       revision: str | None = None) -> nn.Module:
    """A torchvision detection backbone over a zoo model (see the module docstring).

    Returns torchvision's `BackboneWithFPN` (`out_channels` 256; maps "0"-"3" of `returned_layers`, default
    1-4, and "pool") or, with `fpn=False`, a `SingleMapBackbone`. `fpn_norm` (None, "bn" or "sync") puts a
    norm layer in the FPN's convolutions. `.spec` is the registry row, `.transform_kwargs` the
    `image_mean`/`image_std` to give the detector. CPU, train mode, as torchvision builds them.
    """
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    _check_trainable(trainable_layers)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
    if fpn_norm not in (None, "bn", "sync"):
        raise ValueError(f"fpn_norm must be None, 'bn' or 'sync', got {fpn_norm!r}")
    layers = list(returned_layers) if returned_layers is not None else ([1, 2, 3, 4] if fpn else [4])
    if not layers or min(layers) < 1 or max(layers) > 4:
        raise ValueError(f"returned_layers must be stages among 1-4, got {returned_layers}")
    model = convert_norm(_zoo_backbone(name, pretrained, revision), norm)
    spec = model.spec
    if fpn:
        norm_layer = {None: None, "bn": nn.BatchNorm2d, "sync": nn.SyncBatchNorm}[fpn_norm]
        out = _resnet_fpn_extractor(model, trainable_layers, returned_layers=layers, extra_blocks=extra_blocks,
                                    norm_layer=norm_layer)
    else:
        _freeze_layers(model, trainable_layers)
        out = SingleMapBackbone(model, max(layers))
    return _attach(out.train(), spec)


def segmentation_backbone(name: str, aux: bool = False, norm: str = "bn",
                          replace_stride_with_dilation: Sequence[bool] = (False, True, True),
                          pretrained: bool | str | os.PathLike = True, revision: str | None = None
                          ) -> IntermediateLayerGetter:
    """A dilated zoo backbone as torchvision's FCN / DeepLabV3 take it: `{"out": layer4[, "aux": layer3]}`.

    `norm` as in `detection_backbone` (default "bn", as torchvision trains its segmentation models).
    `.out_channels` / `.aux_channels` are the channels of the two maps, `.output_stride` the reduction
    of "out", `.spec` / `.transform_kwargs` as in `detection_backbone`.
    """
    from zoo.features import stage_info

    model = dilate_stages(_zoo_backbone(name, pretrained, revision), replace_stride_with_dilation)
    model = convert_norm(model, norm)
    info = stage_info(model)
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    body = IntermediateLayerGetter(model, return_layers=return_layers)
    body.out_channels = info[4]["num_chs"]
    body.aux_channels = info[3]["num_chs"]
    body.output_stride = info[4]["reduction"]
    return _attach(body.train(), model.spec)
