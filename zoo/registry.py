"""The model registry: one row of data per model, as timm's `pretrained_cfg`.

A name is `{method}-{arch}.{tag}` (`wmse-resnet18_narrow.fmnist`). The hand-written part of a row
(method, arch, tag, preprocessing, recipe, paper) lives in `_ROWS` below; what only a training run
can tell (sha256 of the weights, measured metrics, training minutes) lives in `zoo/pretrained.json`,
which `zoo export` writes. A row without weights is listed, not hidden: `has_weights` says so.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zoo.backbones import ARCHS
from zoo.errors import UnknownNameError, WeightsNotAvailableError, closest

log = logging.getLogger("zoo")

PRETRAINED_JSON = Path(__file__).with_name("pretrained.json")
HUB_ORG = "ssl-zoo"

# ------------------------------------------------------------------------------------------ methods
@dataclass(frozen=True)
class MethodRow:
    """One self-supervised method: its name (recipes' `method.name`, model names' prefix), display name, paper.

    `training.methods` maps each name to the class that implements it; its test checks the two agree.
    """

    name: str
    display: str
    paper: str


_EQUIMOD = ("Devillers & Lefort, EquiMod: An Equivariance Module to Improve Visual Instance Discrimination, "
            "ICLR 2023 (arXiv:2211.01244)")
METHOD_ROWS: tuple[MethodRow, ...] = (
    MethodRow("wmse", "W-MSE", "Ermolov et al., Whitening for Self-Supervised Representation Learning, ICML 2021 "
                               "(arXiv:2007.06346)"),
    MethodRow("msbreg", "MSBReg", "Moon et al., An Embedding-Dynamic Approach to Self-supervised Learning, 2022 "
                                  "(arXiv:2207.03552); no code or formulas were published: ssl-zoo's MSBReg is a "
                                  "documented reconstruction"),
    MethodRow("equimod-simclr", "EquiMod (SimCLR)", f"{_EQUIMOD}, on SimCLR"),
    MethodRow("equimod-byol", "EquiMod (BYOL)", f"{_EQUIMOD}, on BYOL"),
    MethodRow("isd", "ISD", "Tejankar et al., ISD: Self-Supervised Learning by Iterative Similarity Distillation, "
                            "ICCV 2021 (arXiv:2012.09259)"),
    MethodRow("groco", "GroCo", "Shvetsova et al., Learning by Sorting: Self-supervised Learning with Group Ordering "
                                "Constraints, ICCV 2023 (arXiv:2301.02009)"),
    MethodRow("simclr", "SimCLR", "Chen et al., A Simple Framework for Contrastive Learning of Visual "
                                  "Representations, ICML 2020 (arXiv:2002.05709)"),
    MethodRow("byol", "BYOL", "Grill et al., Bootstrap Your Own Latent, NeurIPS 2020 (arXiv:2006.07733)"),
)
METHODS = [m.name for m in METHOD_ROWS]
_METHOD_BY_NAME = {m.name: m for m in METHOD_ROWS}


def get_method(name: str) -> MethodRow:
    """The row of a method name (`wmse`, `equimod-byol`, ...); unknown: a one-line error listing the known ones."""
    if name not in _METHOD_BY_NAME:
        raise UnknownNameError(f"unknown method {name!r}; did you mean {closest(name, METHODS)}? "
                               f"Known: {', '.join(METHODS)}")
    return _METHOD_BY_NAME[name]


# ------------------------------------------------------------------------------------------ datasets
class UnknownDatasetError(UnknownNameError, ValueError):
    """A dataset name no row knows (a KeyError to lookups, a ValueError to argument checks)."""


@dataclass(frozen=True)
class DatasetRow:
    """One pretraining dataset: every name it goes by, what the card shows, and its evaluation preprocessing."""

    tag: str  # model names' suffix: wmse-resnet18_narrow.<tag>
    dataset: str  # ModelSpec.dataset (config.json)
    trainer: str  # recipes' data.dataset (training.data)
    display: str
    num_classes: int
    hub_id: str  # the Hub dataset id of the card's `datasets` metadata
    eval_split: str
    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    aliases: tuple[str, ...] = ()
    # Trainer datasets that borrow this row's tag and normalisation without being its images (test data):
    # a model trained on them exports under this tag, and its card says what it was trained on.
    stand_ins: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.tag, self.dataset, self.trainer, *self.aliases, *self.stand_ins)))

    def preprocessing(self) -> dict[str, Any]:
        """The ModelSpec fields this dataset fixes."""
        return dict(dataset=self.dataset, input_size=self.input_size, resize_size=self.resize_size,
                    mean=self.mean, std=self.std, interpolation=self.interpolation)


_IMAGENET = dict(input_size=224, resize_size=256, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# In default-tag preference order, as the papers report them (ImageNet first).
DATASET_ROWS: tuple[DatasetRow, ...] = (
    DatasetRow("in1k", "imagenet-1k", "imagenet", "ImageNet-1k", 1000, "ILSVRC/imagenet-1k", "validation",
               **_IMAGENET),
    DatasetRow("in100", "imagenet-100", "imagenet100", "ImageNet-100", 100, "imagenet-100", "validation", **_IMAGENET),
    DatasetRow("c10", "cifar10", "cifar10", "CIFAR-10", 10, "uoft-cs/cifar10", "test", 32, 32,
               (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    DatasetRow("c100", "cifar100", "cifar100", "CIFAR-100", 100, "uoft-cs/cifar100", "test", 32, 32,
               (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    DatasetRow("stl10", "stl10", "stl10", "STL-10", 10, "stl10", "test", 64, 70, (0.43, 0.42, 0.39),
               (0.27, 0.26, 0.27)),
    DatasetRow("tin", "tiny-imagenet", "tiny_imagenet", "Tiny ImageNet", 200, "zh-plus/tiny-imagenet", "validation",
               64, 64, (0.480, 0.448, 0.398), (0.277, 0.269, 0.282)),
    # Grayscale repeated to 3 channels, so the one mean/std is repeated too.
    DatasetRow("fmnist", "fashion_mnist", "fashion_mnist", "Fashion-MNIST", 10, "zalando-datasets/fashion_mnist",
               "test", 28, 28, (0.2860,) * 3, (0.3530,) * 3, "bilinear", aliases=("fashion-mnist",),
               stand_ins=("synthetic",)),
)
TAG_ORDER = [d.tag for d in DATASET_ROWS]
# What recipes' data.dataset may say (training.data builds each).
TRAINER_DATASETS = [n for d in DATASET_ROWS for n in (d.trainer, *d.stand_ins)]
_DATASET_BY_NAME = {n: d for d in DATASET_ROWS for n in d.names}


def get_dataset(name: str) -> DatasetRow:
    """The row of any name a dataset goes by: tag (`fmnist`), trainer name (`fashion_mnist`), alias
    (`fashion-mnist`), config.json name (`imagenet-1k`); unknown: a one-line error listing the known ones."""
    if name not in _DATASET_BY_NAME:
        known = [f"{d.display} ({', '.join(n for n in d.names if n not in d.stand_ins)})" for d in DATASET_ROWS]
        known += [f"{s} (generated test images, {d.tag} normalisation)" for d in DATASET_ROWS for s in d.stand_ins]
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {'; '.join(known)}")
    return _DATASET_BY_NAME[name]


# (method, arch, tag) for every model of the mission, on the archs and datasets its paper used,
# plus the CPU arch on Fashion-MNIST for all of them (the weights made on these machines).
_ROWS: list[tuple[str, str, str]] = [
    *[(m, "resnet18_narrow", "fmnist") for m in METHODS],  # first: `<method>/fmnist.yaml` is the CPU arch's
    *[("wmse", a, t) for a, t in [("resnet50", "in1k"), ("resnet18", "in100"), ("resnet18_cifar", "c10"),
                                  ("resnet18_cifar", "c100"), ("resnet18_stl", "stl10"), ("resnet18_stl", "tin"),
                                  ("resnet50", "fmnist")]],
    *[("msbreg", a, t) for a, t in [("resnet50", "in1k"), ("resnet18", "in100"), ("resnet18_stl", "stl10")]],
    *[(m, a, t) for m in ("equimod-simclr", "equimod-byol", "simclr", "byol")
      for a, t in [("resnet50", "in1k"), ("resnet18_cifar", "c10")]],
    *[("isd", a, "in1k") for a in ("resnet50", "resnet18")],
    ("groco", "resnet50", "in1k"),
]


@dataclass(frozen=True)
class ModelSpec:
    """Everything a user needs to trust a weight. Serialised as the Hub repo's `config.json`."""

    name: str
    method: str
    arch: str
    tag: str
    dataset: str
    feature_dim: int
    input_size: int
    resize_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    recipe: str
    paper: str
    hub_repo: str
    weights_file: str = "model.safetensors"
    sha256: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_minutes: float | None = None
    license: str = "mit"
    has_weights: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def short_name(self) -> str:
        return f"{self.method}-{self.arch}"

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


def make_spec(method: str, arch: str, tag: str, **overrides: Any) -> ModelSpec:
    """A registry row built from its three coordinates."""
    name = f"{method}-{arch}.{tag}"
    data = get_dataset(tag).preprocessing()
    row = dict(
        name=name, method=method, arch=arch, tag=tag, feature_dim=ARCHS[arch].feature_dim,
        recipe=f"training/recipes/{method}/{tag}{'' if arch == _default_arch(method, tag) else '-' + arch}.yaml",
        paper=get_method(method).paper, hub_repo=f"{HUB_ORG}/{name}", **data,
    )
    row.update(overrides)
    return ModelSpec.from_dict(row)


def _default_arch(method: str, tag: str) -> str:
    """The arch a recipe file `<method>/<tag>.yaml` trains; other archs get `<tag>-<arch>.yaml`."""
    for m, a, t in _ROWS:
        if m == method and t == tag:
            return a
    raise KeyError((method, tag))


def _load_pretrained_json() -> dict[str, dict[str, Any]]:
    if not PRETRAINED_JSON.exists():
        return {}
    return json.loads(PRETRAINED_JSON.read_text())


def _build() -> dict[str, ModelSpec]:
    measured = _load_pretrained_json()
    specs = {}
    for method, arch, tag in _ROWS:
        spec = make_spec(method, arch, tag)
        if spec.name in measured:
            spec = replace(spec, **{k: v for k, v in measured[spec.name].items() if k in ModelSpec.__dataclass_fields__})
        specs[spec.name] = spec
    return specs


_REGISTRY: dict[str, ModelSpec] | None = None


def registry() -> dict[str, ModelSpec]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build()
    return _REGISTRY


def reload() -> None:
    """Re-read `pretrained.json` (after `zoo export` wrote to it)."""
    global _REGISTRY
    _REGISTRY = None


def list_models(pattern: str = "*", pretrained_only: bool = False) -> list[str]:
    """Registry names matching a glob pattern (`"wmse-*"`), optionally only those with weights."""
    return sorted(n for n, s in registry().items()
                  if fnmatch.fnmatch(n, pattern) and (s.has_weights or not pretrained_only))


def _tag_rank(tag: str) -> int:
    return TAG_ORDER.index(tag) if tag in TAG_ORDER else len(TAG_ORDER)


_logged_defaults: set[str] = set()


def _no_weights_message(name: str, recipe: str, short_name: str) -> str:
    """One line: what has no weights, the recipe that makes them, and the tags that do have weights."""
    method = registry()[next(n for n in registry() if n.startswith(short_name + "."))].method
    for what, pattern in (("a tag with weights", f"{short_name}.*"), ("a model with weights", f"{method}-*"),
                          ("a model with weights", "*")):
        others = list_models(pattern, pretrained_only=True)
        if others:
            break
    return (f"no weights are published for {name!r}; train them with `zoo train {recipe}`, pass "
            f"pretrained=PATH, or load {what}: {', '.join(others) or 'none yet'}")


def get_spec(name: str, need_weights: bool = False) -> ModelSpec:
    """The registry row of a full name, or of `{method}-{arch}` (its default tag).

    The default tag is the first in `TAG_ORDER` with weights available; without any, the first tag
    (so `pretrained=False` still builds the architecture) unless `need_weights`, which raises.
    """
    reg = registry()
    if name in reg:
        spec = reg[name]
        if need_weights and not spec.has_weights:
            # No sha256 to check a download against, and nothing published: say so at once
            # rather than after the Hub client's retries.
            raise WeightsNotAvailableError(_no_weights_message(name, spec.recipe, spec.short_name))
        return spec
    candidates = sorted((s for s in reg.values() if s.short_name == name), key=lambda s: _tag_rank(s.tag))
    if not candidates:
        names = list(reg) + sorted({s.short_name for s in reg.values()})
        raise UnknownNameError(f"unknown model {name!r}; did you mean {closest(name, names)}? "
                               f"(zoo.list_models() lists them all)")
    with_weights = [s for s in candidates if s.has_weights]
    if with_weights:
        spec = with_weights[0]
    elif need_weights:
        raise WeightsNotAvailableError(_no_weights_message(name, candidates[0].recipe, name))
    else:
        spec = candidates[0]
    if name not in _logged_defaults:
        _logged_defaults.add(name)
        log.info("%s -> %s", name, spec.name)
    return spec
