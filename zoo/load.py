"""`zoo.load`: one function turns a name into a ready backbone with its preprocessing (open_clip style)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from zoo.backbones import Backbone, create_backbone
from zoo.errors import CheckpointMismatchError, IntegrityError, WeightsNotAvailableError
from zoo.hub import resolve_verified_weights, verify_sha256
from zoo.preprocess import Preprocess
from zoo.registry import ModelSpec, get_spec


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


def _weights_from_path(path: Path, spec: ModelSpec) -> tuple[Path, ModelSpec]:
    """A `.safetensors` file, or a folder laid out as a Hub repo (model.safetensors + config.json)."""
    if path.is_dir():
        config = path / "config.json"
        if config.exists():
            spec = ModelSpec.from_dict({**spec.to_dict(), **json.loads(config.read_text())})
        weights = path / spec.weights_file
        if not weights.exists():
            raise WeightsNotAvailableError(f"{path} has no {spec.weights_file}; pass the folder `zoo export` wrote "
                                           f"or a .safetensors file")
        verify_sha256(weights, spec.sha256, f"{config.name} in {path}")
        return weights, spec
    if not path.exists():
        raise WeightsNotAvailableError(f"pretrained={str(path)!r} does not exist; pass a .safetensors file or a "
                                       f"folder written by `zoo export`")
    return path, spec


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
