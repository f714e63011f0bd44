"""`zoo.load`: one function turns a name into a ready backbone with its preprocessing (open_clip style)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

from zoo.backbones import Backbone, create_backbone
from zoo.errors import CheckpointMismatchError, IntegrityError, WeightsNotAvailableError
from zoo.hub import resolve_verified_weights, sha256_file, verify_sha256
from zoo.preprocess import Preprocess
from zoo.registry import ModelSpec, get_spec

log = logging.getLogger("zoo")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never unpickles); a damaged file is a one-line error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise IntegrityError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                             f"download or export it again") from e


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that names every missing, unexpected or mis-shaped key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(keys: list[str]) -> str:
            return ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
        parts = [f"missing {few(missing)}" if missing else "", f"unexpected {few(unexpected)}" if unexpected else "",
                 f"shape mismatch {few(shapes)}" if shapes else ""]
        raise CheckpointMismatchError(
            f"{source} does not fit arch {getattr(model, 'arch', type(model).__name__)}: "
            f"{'; '.join(p for p in parts if p)}; pick the model name of the arch it was trained with, "
            f"or convert it with `zoo convert`")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# A row's fields that only a measurement of particular bytes can vouch for, and those that say how to feed it.
_MEASURED = ("metrics", "train_minutes", "recipe", "extra", "has_weights")
_PREPROCESSING = ("input_size", "resize_size", "mean", "std", "interpolation")


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{path} is not valid JSON ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             f"fix it, or export/convert the folder again") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{path} is not a JSON object; fix it, or export/convert the folder again")
    return config


def _unmeasured(spec: ModelSpec, sha: str, why: str, config: dict | None = None) -> ModelSpec:
    """`spec` for bytes nobody measured: the method/arch and preprocessing stay, no metrics, recipe or minutes.

    A converted folder's `extra.converted_from` (format, source sha256, encoder, where its preprocessing
    came from) is provenance, not a measurement: it stays."""
    log.info("%s", why)
    extra = (config or {}).get("extra")
    kept = {"converted_from": extra["converted_from"]} if isinstance(extra, dict) and "converted_from" in extra else {}
    return replace(spec, name=spec.short_name if spec.name.startswith(f"{spec.short_name}.") else spec.name,
                   sha256=sha, metrics={}, train_minutes=None, recipe="", has_weights=False,
                   extra={"unmeasured": why, **kept})


def _weights_from_path(path: Path, spec: ModelSpec) -> tuple[Path, ModelSpec]:
    """A `.safetensors` file, or a folder laid out as a Hub repo (model.safetensors + config.json).

    Identity (metrics, recipe, minutes) is claimed only by the bytes that were measured: the registry row's
    when the file's sha256 is the row's, the folder's config.json when it records this file's sha256 and
    names no registry model whose weights are other bytes. A folder's config may set preprocessing only when
    its bytes are not a registry model's (a converted or privately trained model); the arch must be `spec`'s.
    """
    if not path.exists():
        raise WeightsNotAvailableError(f"pretrained={str(path)!r} does not exist; pass a .safetensors file or a "
                                       f"folder written by `zoo export` or `zoo convert`")
    config: dict = {}
    if path.is_dir():
        if (path / "config.json").exists():
            config = _read_config(path / "config.json")
        weights_file = config.get("weights_file", spec.weights_file)
        if not isinstance(weights_file, str) or Path(weights_file).name != weights_file or weights_file in ("", ".", ".."):
            raise IntegrityError(f"{path / 'config.json'}: weights_file {weights_file!r} must name a file inside "
                                 f"the folder; set it to model.safetensors")
        weights = path / weights_file
        if not weights.is_file():
            raise WeightsNotAvailableError(f"{path} has no {weights_file}; pass the folder `zoo export` wrote "
                                           f"or a .safetensors file")
    else:
        weights = path
    actual = sha256_file(weights)
    if config.get("sha256"):
        verify_sha256(weights, config["sha256"], f"config.json in {path}")
    if spec.sha256 and actual == spec.sha256:  # the registry's own bytes: the row is their owner
        changed = [k for k in ("arch", "method", "feature_dim", *_PREPROCESSING)
                   if k in config and _normal(config[k]) != _normal(getattr(spec, k))]
        if changed:
            raise IntegrityError(f"{path / 'config.json'} changes {', '.join(changed)} of {spec.name}, whose weights "
                                 f"these are; restore those fields (or export the folder again)")
        return weights, spec
    if config.get("arch", spec.arch) != spec.arch:
        raise CheckpointMismatchError(f"{path / 'config.json'} is arch {config['arch']!r}, {spec.name} is "
                                      f"{spec.arch!r}; load it with a model name of arch {config['arch']!r}")
    where = f"{weights} (sha256 {actual[:12]}...)"
    if not config:
        own = f"{spec.name}'s" if spec.sha256 else "the registry row's"
        return weights, _unmeasured(spec, actual, (
            f"{where} is not the registry's weights of {spec.name}: it gets {own} preprocessing "
            f"({spec.input_size} px, mean {list(spec.mean)}, std {list(spec.std)}) and claims no metrics; pass a "
            f"folder with a config.json (zoo convert writes one) to set its preprocessing"))
    row = {**spec.to_dict(), **{k: config[k] for k in (*_PREPROCESSING, "tag", "dataset") if k in config}}
    if "method" in config and config["method"] != spec.method:
        raise CheckpointMismatchError(f"{path / 'config.json'} is method {config['method']!r}, not {spec.method!r}; "
                                      f"load it as {config['method']}-{spec.arch}")
    if not config.get("sha256"):
        return weights, _unmeasured(ModelSpec.from_dict(row), actual, (
            f"{path / 'config.json'} records no sha256, so nothing vouches for its claims: {where} is loaded "
            f"with its preprocessing and no metrics; `zoo export` or `zoo convert` writes the sha256"))
    claimed = config.get("name")
    if claimed and claimed == spec.name and spec.sha256:
        return weights, _unmeasured(ModelSpec.from_dict(row), actual, (
            f"{where} is not the registry's weights of {spec.name}: its config's metrics were not measured on "
            f"these bytes by the registry; loaded with the folder's preprocessing and no metrics"), config)
    # The folder's own claims, written beside these bytes (a private export, or `zoo convert`'s provenance).
    measured = {"metrics": {}, "train_minutes": None, "recipe": "", "extra": {}, "has_weights": True,
                **{k: config[k] for k in _MEASURED if k in config}}
    return weights, ModelSpec.from_dict({**row, **measured, "name": claimed or spec.short_name, "sha256": actual})


def _normal(value: object) -> object:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value


def load(name: str, pretrained: bool | str | os.PathLike = True, device: str | torch.device | None = None,
         revision: str | None = None, features_only: bool = False,
         out_indices: Sequence[int] | int | None = None) -> Backbone:
    """The backbone of a registry model, in eval mode, with `.spec` and `.preprocess` attached.

    `name` is `{method}-{arch}.{tag}` or `{method}-{arch}` (its default tag). `pretrained` is True
    (registry weights: model_cards/ -> HF cache -> Hub, sha256-checked), False (untrained), or a path
    to a `.safetensors` file or to a Hub-layout folder. `revision` (a branch, tag or commit sha of the
    model's Hub repository) pins the Hub weights: they come from that revision (or the cache), checked
    against that revision's config.json.

    `features_only=True` returns a `zoo.features.FeatureBackbone` over the same weights: a list of
    feature maps at `out_indices` (default (1, 2, 3, 4): layer1-layer4; 0 is the stem) and
    `.feature_info` (channels and reduction of each map, timm's API).
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"zoo.load needs a model name such as 'wmse-resnet18_narrow.fmnist', got {name!r}; "
                        f"zoo.list_models() lists them")
    if out_indices is not None and not features_only:
        raise ValueError("out_indices selects feature maps: pass it with features_only=True")
    if features_only and out_indices is not None:
        from zoo.features import check_out_indices

        check_out_indices(out_indices)  # before any weight is read
    if revision is not None and pretrained is not True:
        raise ValueError(f"revision={revision!r} pins Hub weights; use it with pretrained=True, or drop it when "
                         f"loading pretrained={pretrained!r}")
    spec = get_spec(name, need_weights=pretrained is True and revision is None)
    model = create_backbone(spec.arch)
    if pretrained is not False:
        if pretrained is True:
            weights, spec = resolve_verified_weights(spec, revision)
        else:
            weights, spec = _weights_from_path(Path(pretrained), spec)
        load_weights_into(model, load_state_dict_file(weights), str(weights))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    model.spec = spec
    model.preprocess = Preprocess.from_spec(spec)
    if features_only:
        from zoo.features import features_only as feature_maps

        return feature_maps(model, (1, 2, 3, 4) if out_indices is None else out_indices)
    return model
