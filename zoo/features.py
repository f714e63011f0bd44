"""Feature maps of any stage: `zoo.load(name, features_only=True)` and pooled features of one stage.

    model = zoo.load("wmse-resnet50", features_only=True, out_indices=(1, 2, 3, 4))
    maps = model(model.preprocess(image)[None])        # [layer1, layer2, layer3, layer4] maps, NCHW
    model.feature_info.channels()                      # [256, 512, 1024, 2048]
    model.feature_info.reduction()                     # [4, 8, 16, 32] (ImageNet stem)

Stage indices follow timm's ResNets: 0 is the stem (after conv1-bn1-relu, before the max-pool),
1-4 are `layer1`-`layer4`. Channels and reductions (output strides) are read from the modules of
the arch (conv1's stride, the max-pool if any, each stage's stride), never written per name: the
CIFAR stem reports 1, 1, 2, 4, 8 and `resnet18_narrow` (stride-2 stem, no max-pool) 2, 2, 4, 8, 16.

`FeatureBackbone` is torchvision's `IntermediateLayerGetter` over the pooled backbone's own child
modules (the same parameter tensors: no copy), with the backbone's grayscale-to-3-channel input
handling in front; its state-dict keys are the backbone's (`conv1.weight`, `layer1.0...`).
`feature_info` is a `FeatureInfo` with timm's API (`channels()`, `reduction()`, `module_name()`,
`get_dicts()`; indexing and `len` over every stage, the accessors over `out_indices`).

`StagePool` pools one stage's map (`avg`, `gem` with p = 3, `max`, or `none`: the map flattened);
`zoo.embed(..., layer=, pool=)` runs through it.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter

from zoo.backbones import as_three_channels

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
POOLS = ("avg", "gem", "max", "none")
GEM_P = 3.0
GEM_EPS = 1e-6


class FeatureInfo:
    """Channels, reduction and module of each stage (timm's `FeatureInfo` API).

    `info` lists every stage as `{"num_chs", "reduction", "module", "index", "stage"}`; `out_indices`
    are the stages a features-only model returns. `get(key)`, `channels()`, `reduction()` and
    `module_name()` answer for `out_indices` (or for `idx`, an int or list of stage indices);
    `info[i]` and `len(info)` cover every stage, as in timm.
    """

    def __init__(self, info: list[dict[str, Any]], out_indices: Sequence[int]):
        self.info = info
        self.out_indices = tuple(out_indices)

    def get(self, key: str, idx: int | Sequence[int] | None = None) -> Any:
        if idx is None:
            return [self.info[i][key] for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [self.info[i][key] for i in idx]
        return self.info[idx][key]

    def get_dicts(self, keys: Sequence[str] | None = None, idx: int | Sequence[int] | None = None) -> Any:
        def pick(i: int) -> dict[str, Any]:
            return dict(self.info[i]) if keys is None else {k: self.info[i][k] for k in keys}

        if idx is None:
            return [pick(i) for i in self.out_indices]
        if isinstance(idx, (list, tuple)):
            return [pick(i) for i in idx]
        return pick(idx)

    def channels(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("num_chs", idx)

    def reduction(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("reduction", idx)

    def module_name(self, idx: int | Sequence[int] | None = None) -> Any:
        return self.get("module", idx)

    def from_other(self, out_indices: Sequence[int]) -> "FeatureInfo":
        return FeatureInfo([dict(d) for d in self.info], out_indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, {self.get_dicts(('module', 'num_chs', 'reduction'))})"


def _stride(module: nn.Module) -> int:
    s = getattr(module, "stride", 1)
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def _out_channels(stage: nn.Module) -> int:
    """Channels a ResNet stage (nn.Sequential of blocks) outputs: its last block's last convolution's."""
    last = list(stage.children())[-1]
    return int([m for m in last.modules() if isinstance(m, nn.Conv2d)][-1].out_channels)


def stage_info(backbone: nn.Module) -> list[dict[str, Any]]:
    """`{"num_chs", "reduction", "module", "index", "stage"}` of the stem and each stage, from the modules.

    Reduction = conv1's stride x the max-pool's (1 when it is Identity) x the stride of every block up to
    the stage (torchvision blocks keep theirs in `.stride`; a dilated stage has stride 1).
    """
    reduction = _stride(backbone.conv1)
    info = [{"num_chs": int(backbone.conv1.out_channels), "reduction": reduction, "module": "relu", "index": 0,
             "stage": "stem"}]
    if isinstance(backbone.maxpool, (nn.MaxPool2d, nn.AvgPool2d)):
        reduction *= _stride(backbone.maxpool)
    for i in range(1, 5):
        layer = getattr(backbone, f"layer{i}")
        for block in layer.children():
            reduction *= _stride(block)
        info.append({"num_chs": _out_channels(layer), "reduction": reduction, "module": f"layer{i}", "index": i,
                     "stage": f"layer{i}"})
    return info


def check_out_indices(out_indices: Sequence[int] | int, n: int = len(STAGES)) -> tuple[int, ...]:
    """Stage indices, negatives counted from the end (timm's convention), in increasing order; a bad one raises."""
    if isinstance(out_indices, int):
        out_indices = (out_indices,)
    valid = f"valid indices are 0-{n - 1} ({', '.join(f'{i}={s}' for i, s in enumerate(STAGES[:n]))}) or -{n} to -1"
    chosen = []
    for i in out_indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise IndexError(f"out_indices {tuple(out_indices)}: {i!r} is out of range; {valid}")
        chosen.append(i % n)
    if not chosen or len(set(chosen)) != len(chosen):
        raise IndexError(f"out_indices {tuple(out_indices)} must name each stage once; {valid}")
    return tuple(sorted(chosen))


class FeatureBackbone(IntermediateLayerGetter):
    """A backbone's feature maps at `out_indices`, as a list (torchvision `IntermediateLayerGetter`).

    Built on the backbone's own modules (shared parameters and buffers, no copy). Input: `[N, 1 or 3,
    H, W]`, grayscale repeated to 3 channels exactly as the pooled backbone does. `.spec`,
    `.preprocess` and `.arch` are the backbone's; `.feature_info` says each map's channels and reduction.
    """

    def __init__(self, backbone: nn.Module, out_indices: Sequence[int] | int = (1, 2, 3, 4)):
        info = stage_info(backbone)
        indices = check_out_indices(out_indices, len(info))
        super().__init__(backbone, return_layers={info[i]["module"]: f"feature_{i}" for i in indices})
        self.feature_info = FeatureInfo(info, indices)
        self.out_indices = indices
        self.training = backbone.training  # the shared modules keep their own mode
        for attr in ("arch", "spec", "preprocess"):
            if hasattr(backbone, attr):
                setattr(self, attr, getattr(backbone, attr))

    @property
    def output_names(self) -> list[str]:
        """`feature_<stage index>` for each returned map (the ONNX output names too)."""
        return [f"feature_{i}" for i in self.out_indices]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # type: ignore[override]
        return list(super().forward(as_three_channels(x)).values())


def features_only(backbone: nn.Module, out_indices: Sequence[int] | int = (1, 2, 3, 4)) -> FeatureBackbone:
    """The feature-map view of a `zoo.load` backbone (same weights, preprocessing and spec)."""
    return FeatureBackbone(backbone, out_indices)


# ------------------------------------------------------------------------------------------ pooling
def gem(x: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """Generalised-mean pooling over H, W (Radenovic et al. 2018): mean(clamp(x, eps)^p)^(1/p) -> `[N, C]`."""
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def pool_map(x: torch.Tensor, pool: str) -> torch.Tensor:
    """`[N, C, h, w]` -> `[N, C]` (avg, gem, max) or `[N, C*h*w]` (none: the map flattened, C-major)."""
    if pool == "avg":
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)  # what the pooled backbone computes
    if pool == "gem":
        return gem(x)
    if pool == "max":
        return torch.flatten(F.adaptive_max_pool2d(x, 1), 1)
    if pool == "none":
        return torch.flatten(x, 1)
    raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")


def check_layer(layer: str | None) -> str:
    layer = "layer4" if layer is None else layer
    if layer not in STAGES:
        raise ValueError(f"layer must be one of {', '.join(STAGES)}, got {layer!r}")
    return layer


def map_shape(module: nn.Module, input_size: int) -> tuple[int, ...]:
    """Shape `[C, h, w]` of each map a `FeatureBackbone` returns at `input_size` px, on the meta device (free)."""
    from torch.func import functional_call

    # Meta copies of every tensor: nothing is computed or written, whatever mode the modules are in
    # (batch 2: a train-mode BatchNorm refuses one value per channel).
    tensors = {k: torch.empty_like(v, device="meta")
               for k, v in itertools.chain(module.named_parameters(), module.named_buffers())}
    with torch.no_grad():
        out = functional_call(module, tensors, (torch.empty(2, 3, input_size, input_size, device="meta"),))
    return [tuple(o.shape[1:]) for o in out]


class StagePool(nn.Module):
    """One stage's map, pooled: `[N, 1 or 3, H, W]` -> `[N, C]` (avg / gem / max) or `[N, C*h*w]` (none).

    Shares the backbone's modules. `.map_shape` is `(C, h, w)` at the model's input size, `.feature_dim`
    the width of a row at that size, `.spec` / `.preprocess` the backbone's.
    """

    def __init__(self, backbone: nn.Module, layer: str = "layer4", pool: str = "avg"):
        super().__init__()
        layer = check_layer(layer)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        self.body = FeatureBackbone(backbone, (STAGES.index(layer),))
        self.layer, self.pool = layer, pool
        self.training = backbone.training
        for attr in ("arch", "spec", "preprocess"):
            if hasattr(backbone, attr):
                setattr(self, attr, getattr(backbone, attr))
        spec = getattr(backbone, "spec", None)
        self.map_shape = map_shape(self.body, int(spec.input_size))[0] if spec is not None else None
        channels = self.body.feature_info.channels()[0]
        if pool != "none":
            self.feature_dim = channels
        else:
            self.feature_dim = None if self.map_shape is None else int(torch.Size(self.map_shape).numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pool_map(self.body(x)[0], self.pool)


def stage_model(model: nn.Module, layer: str | None = None, pool: str = "avg") -> nn.Module:
    """`model` itself for the default (layer4, avg: the pooled backbone), else a cached `StagePool` over it."""
    layer = check_layer(layer)
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if layer == "layer4" and pool == "avg":
        return model
    if not hasattr(model, "layer4"):
        raise ValueError(f"layer={layer!r} / pool={pool!r} need a zoo backbone (zoo.load(name)); got a "
                         f"{type(model).__name__}")
    cache = model.__dict__.setdefault("_zoo_stage_models", {})  # not a submodule: out of state_dict
    if (layer, pool) not in cache:
        cache[(layer, pool)] = StagePool(model, layer, pool)
    wrapper = cache[(layer, pool)]
    wrapper.training = wrapper.body.training = model.training  # follow model.train()/eval() (shallow)
    return wrapper
