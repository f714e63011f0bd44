"""Where `zoo convert` reads from: each project's checkpoint layout (`FORMATS`) and reading a file in it.

Each format is one row of `FORMATS` (data, not code): which top-level entry of the file holds the
state dict, which key prefix is the backbone to keep (and what it becomes: torchvision ResNet names,
ssl-zoo's `Backbone` layout), which prefixes are the other parts of the method (projector, predictor,
momentum / teacher copies, queues, classifier) that are dropped, and which encoder is kept and why.
Layouts were read from each project's own code (files and commits in the rows' `source`); the code is
not copied here.

Files are read with `torch.load(..., weights_only=True)` only (or safetensors). A checkpoint that
pickles anything beyond tensors, containers and plain values is refused with a one-line message naming
the class and how to re-save it. `argparse.Namespace` (the `opt` / `args` entry ISD and timm's trainer
store) is the one class allowed in: it only restores attributes, runs no code.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.errors import UnknownNameError, ZooError, closest

# Classes a checkpoint may contain besides tensors and plain containers (weights_only allowlist).
SAFE_GLOBALS = (argparse.Namespace,)


class ConversionError(ZooError, ValueError):
    """A checkpoint that cannot be converted as asked (unsafe pickle, unknown/missing keys, wrong arch)."""


# DDP / DataParallel, torch.compile, a LightningModule holding `self.model`.
WRAPPERS = ("module.", "_orig_mod.", "model.")
_IMAGENET_MEAN_STD = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

@dataclass(frozen=True)
class Format:
    """How one project's code lays out a checkpoint, and which of its encoders is the backbone."""

    name: str
    description: str
    source: str  # the code (repository, file, commit) the layout was read from
    containers: tuple[str, ...]  # top-level entries holding the state dict, first present wins
    keep: tuple[tuple[str, str], ...]  # (prefix in the file, prefix in ssl-zoo's Backbone), first match wins
    drop: tuple[str, ...]  # prefixes of the method's other parts; checked before `keep`
    encoder: str  # which encoder is kept, and why (printed with every conversion)
    resave: str  # how to re-save a file that needs unpickling, in the original code
    backbone: str = ""  # prefix of the encoder kept by default; --keep P reads P's keys as if under it
    # (prefix, why): another name of the encoder, read when no key is under `backbone` (older / example layouts)
    fallbacks: tuple[tuple[str, str], ...] = ()
    wrappers: tuple[str, ...] = WRAPPERS  # wrapper levels removed where they are a parent's only child
    # ImageNet-stem archs' evaluation preprocessing (input_size, resize_size, mean, std, interpolation) for a
    # format whose models are ImageNet models (timm, torchvision); None: the dataset `--arch` is trained on.
    preprocessing: dict[str, Any] | None = None
    small_stem_refusal: str = ""  # why a 3x3-stem arch cannot hold this format's models (refused, rc != 0)


_RESAVE_STATE = "load it where its code is importable and save the {what} alone: {how}"

FORMATS: dict[str, Format] = {f.name: f for f in [
    Format(
        "groco", "GroCo authors' checkpoints (latest_model.pth, checkpoint-epochN.pth)",
        "github.com/ninatu/learning_by_sorting@47c074e: base/base_trainer.py _save_checkpoint, "
        "models/encoder/regular_encoder.py (torchvision ResNet as `.encoder`, fc = Identity, DDP `module.`)",
        containers=("encoder",),
        keep=(("encoder.", ""),),
        drop=(),
        backbone="encoder.",
        encoder="`encoder` (GroCo trains a single encoder; its k-NN and linear evaluations run on it); the "
                "`projection` head and optimizer state are other entries of the file and are not read",
        resave=_RESAVE_STATE.format(what="encoder state dict",
                                    how="torch.save(torch.load(path)['encoder'], 'groco_encoder.pth')"),
    ),
    Format(
        "wmse", "htdt/self-supervised saved model (data/{method}_{dataset}_{epoch}.pt): the method's state dict",
        "github.com/htdt/self-supervised@d9662c8: train.py torch.save(model.state_dict()), model.py get_model "
        "(nn.DataParallel(torchvision resnet), fc = Identity), methods/{base,w_mse,byol,contrastive}.py",
        containers=(),
        keep=(("model.", ""),),
        drop=("head.", "whitening.", "model_t.", "head_t.", "pred.", "bn_last."),
        backbone="model.", wrappers=("module.", "_orig_mod."),  # `model` is the encoder's own name here
        encoder="`model` (the encoder E: test.py evaluates model_full.model); the projection `head`, W-MSE's "
                "`whitening`, and BYOL's target copy `model_t` / `head_t` and predictor `pred` are dropped",
        resave=_RESAVE_STATE.format(what="state dict", how="torch.save(model.state_dict(), 'wmse.pt')"),
    ),
    Format(
        "isd", "UMBCvision/ISD checkpoints (ckpt_epoch_N.pth: opt, state_dict, optimizer, epoch)",
        "github.com/UMBCvision/ISD@4bdd603: train_isd.py / train_isd_plus.py ISD module (encoder_q / encoder_k "
        "wrapped in nn.DataParallel, predict_q, queue buffers), eval_knn.py / eval_linear.py keep encoder_q",
        containers=("state_dict", "model"),
        keep=(("encoder_q.", ""),),
        drop=("encoder_q.fc.", "encoder_k.", "predict_q.", "queue", "labels"),
        backbone="encoder_q.",
        encoder="`encoder_q`, the student (ISD's eval_knn.py and eval_linear.py evaluate it); the teacher "
                "`encoder_k` (momentum copy), the predictor `predict_q`, the student's MLP `fc` (ISD+) and "
                "the similarity queue are dropped",
        resave=_RESAVE_STATE.format(what="state dict",
                                    how="torch.save(torch.load(path)['state_dict'], 'isd_state.pth')"),
    ),
    Format(
        "equimod", "ADevillers/EquiMod checkpoints (SimCLR+EquiMod and BYOL+EquiMod branches)",
        "github.com/ADevillers/EquiMod: branches SimCLR+EquiMod@908c7b4 and BYOL+EquiMod@5c936cf, src/main.py "
        "checkpoint_data (model, momentum_model, optimizer_repr, schedulers) and src/model.py (`resnet`, "
        "fc = Identity)",
        containers=("model",),
        keep=(("resnet.", ""),),
        backbone="resnet.",
        drop=("proj_head_inv.", "proj_head_eq.", "proj_head_t.", "predictor_eq.", "predictor_inv."),
        encoder="`model.resnet`, the online encoder (EquiMod's linear evaluation runs model.resnet); the "
                "invariance / equivariance heads and predictors are dropped, BYOL's `momentum_model` "
                "(m_resnet, m_proj_head_inv) is another entry of the file and is not read",
        resave=_RESAVE_STATE.format(what="model state dict",
                                    how="torch.save(torch.load(path)['model'], 'equimod_model.pt')"),
    ),
    Format(
        "solo-learn", "solo-learn PyTorch Lightning .ckpt files",
        "github.com/vturrisi/solo-learn@9187ea3: solo/methods/base.py (`backbone` = torchvision resnet, fc = "
        "Identity; BaseMomentumMethod `momentum_backbone`), solo/methods/*.py heads",
        containers=("state_dict",),
        keep=(("backbone.", ""),),
        backbone="backbone.",
        fallbacks=(("encoder.", "solo-learn <= 1.0.4 names the online backbone `encoder` (`momentum_encoder` "
                                "dropped)"),),
        drop=("momentum_backbone.", "momentum_encoder.", "projector.", "momentum_projector.", "predictor.", "classifier.",
              "momentum_classifier.", "head.", "momentum_head.", "prototypes.", "queue", "whitening.",
              "transformer_encoder.", "decoder", "mask_token"),
        encoder="`backbone` (the online network: what solo-learn's main_knn.py, main_linear.py and online "
                "classifier evaluate); `momentum_backbone` and the projector / predictor / heads / queues are "
                "dropped",
        resave=_RESAVE_STATE.format(what="state dict",
                                    how="torch.save(torch.load(path, weights_only=False)['state_dict'], 'solo.pt')"),
        small_stem_refusal="solo-learn's CIFAR ResNets pad their 3x3 stem by 2 (solo/methods/base.py: "
                           "nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2), maxpool Identity) and every "
                           "ssl-zoo 3x3-stem arch pads by 1, so the features would differ (~11%); not converted. "
                           "ImageNet-stem solo-learn models convert (--arch resnet18 / resnet50)",
    ),
    Format(
        "lightly", "lightly (LightningModule) .ckpt files: benchmarks and examples with a torchvision ResNet",
        "github.com/lightly-ai/lightly@e8d317f: benchmarks/imagenet/resnet50/*.py (`backbone` = resnet50 with "
        "fc = Identity; teacher/key/momentum copies), docs/source/getting_started/benchmarks/imagenet100_benchmark.py "
        "(`backbone` = nn.Sequential(*list(resnet.children())[:-1]): 0 conv1, 1 bn1, 4-7 layer1-4)",
        containers=("state_dict",),
        keep=(("backbone.0.", "conv1."), ("backbone.1.", "bn1."), ("backbone.4.", "layer1."),
              ("backbone.5.", "layer2."), ("backbone.6.", "layer3."), ("backbone.7.", "layer4."),
              ("backbone.", "")),
        backbone="backbone.",
        fallbacks=(("teacher_backbone.", "lightly's DINO example (student_backbone / teacher_backbone): DINO "
                                         "evaluates the teacher; --keep student_backbone. for the student"),),
        drop=("backbone_momentum.", "projection_head.", "projection_head_momentum.", "prediction_head.",
              "online_classifier.", "teacher_backbone.", "teacher_head.", "teacher_projection_head.",
              "student_backbone.", "student_head.", "student_projection_head.", "key_backbone.",
              "key_projection_head.", "anchor_backbone.", "anchor_projection_head.", "local_projection_head.",
              "head.", "prototypes.", "queues.", "memory_bank.", "criterion.", "knn_classifier."),
        encoder="`backbone`, the network the module's forward() runs and lightly's k-NN / linear evaluations "
                "use (online for BYOL / SimCLR, query for MoCo, teacher in the ResNet-50 DINO benchmark); the "
                "momentum / teacher / student / key copies, heads, prototypes, queues and online classifier "
                "are dropped. lightly's own ResNetGenerator layout (`shortcut`, `linear`) is not torchvision's "
                "and is not supported",
        resave=_RESAVE_STATE.format(what="state dict",
                                    how="torch.save(torch.load(path, weights_only=False)['state_dict'], "
                                        "'lightly.pt')"),
    ),
    Format(
        "torchvision", "a plain torchvision ResNet state dict (model.state_dict(), e.g. resnet50-*.pth)",
        "torchvision.models.resnet (conv1, bn1, layer1-4, fc)",
        containers=("state_dict", "model"),
        keep=(("", ""),),
        drop=("fc.",),
        preprocessing=dict(input_size=224, resize_size=256, **_IMAGENET_MEAN_STD, interpolation="bilinear"),
        encoder="the whole network; the classifier `fc` is dropped",
        resave=_RESAVE_STATE.format(what="state dict", how="torch.save(model.state_dict(), 'resnet.pth')"),
    ),
    Format(
        "timm", "a timm ResNet state dict (pytorch_model.bin / model.safetensors, or a timm train.py checkpoint)",
        "github.com/huggingface/pytorch-image-models@aa4b585: timm/models/resnet.py (conv1, bn1, layer1-4 with "
        "downsample.0/.1 as torchvision, classifier `fc`; deep-stem / avg-down variants such as resnet50d have "
        "conv1.0-6 and downsample.1/.2 and do not fit a torchvision arch)",
        containers=("state_dict", "model"),
        keep=(("", ""),),
        drop=("fc.",),
        # timm's pretrained_cfg of resnet18 / resnet50 (a1_in1k, timm 1.0.31): 224 px, crop_pct 0.95 -> 235, bicubic
        preprocessing=dict(input_size=224, resize_size=235, **_IMAGENET_MEAN_STD, interpolation="bicubic"),
        encoder="the whole network (`state_dict`, not `state_dict_ema`, for a train.py checkpoint); the "
                "classifier `fc` is dropped",
        resave=_RESAVE_STATE.format(what="state dict", how="torch.save(model.state_dict(), 'timm_resnet.pth')"),
    ),
]}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise UnknownNameError(f"unknown checkpoint format {name!r}; did you mean {closest(name, FORMATS)}? "
                               f"Known: {', '.join(FORMATS)}")
    return FORMATS[name]


PREPROCESSING = ("input_size", "resize_size", "mean", "std", "interpolation")


def preprocessing_for(form: Format, arch: str, spec: Any, overrides: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """(input_size, resize_size, mean, std, interpolation) the converted folder records, and where they come from.

    The registry row's with `--name`; else the format's own (timm, torchvision: ImageNet models) for an
    ImageNet-stem arch; else the dataset `arch` is trained on (its first registry row by tag order: CIFAR
    archs -> c10, ImageNet archs -> in1k). Flags override any of them.
    """
    from zoo.backbones import get_arch
    from zoo.registry import TAG_ORDER, get_dataset, registry

    small = get_arch(arch).small_stem
    if spec is not None:
        base, origin, tag = {k: getattr(spec, k) for k in PREPROCESSING}, f"registry row {spec.name}", spec.tag
    elif form.preprocessing is not None and not small:  # a 3x3 stem is not one of the format's ImageNet models
        base, origin, tag = dict(form.preprocessing), f"{form.name} defaults", "in1k"
    else:
        tags = sorted((s.tag for s in registry().values() if s.arch == arch), key=TAG_ORDER.index)
        tag = tags[0] if tags else ("c10" if small else "in1k")
        row = get_dataset(tag).preprocessing()
        base, origin = {k: row[k] for k in PREPROCESSING}, f"{get_dataset(tag).display} (the dataset of {arch})"
    # The dataset the preprocessing belongs to: a loaded spec must not keep the row's (e.g. fmnist) by default.
    base = {**base, "tag": tag, "dataset": get_dataset(tag).dataset}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "input_size" in given and "resize_size" not in given:  # keep the crop ratio of the defaults
        given["resize_size"] = round(given["input_size"] * base["resize_size"] / base["input_size"])
    prep = {**base, **given}
    if given:  # preprocessing of the user's choosing: no longer a known dataset's
        prep["dataset"] = f"{prep['dataset']} (preprocessing overridden)"
    prep["mean"], prep["std"] = [float(v) for v in prep["mean"]], [float(v) for v in prep["std"]]
    if len(prep["mean"]) != 3 or len(prep["std"]) != 3 or min(prep["std"]) <= 0:
        raise ConversionError(f"mean {prep['mean']} / std {prep['std']}: pass three values each (--mean R G B, "
                              f"--std R G B), std > 0")
    if not 0 < prep["input_size"] <= prep["resize_size"]:
        raise ConversionError(f"input size {prep['input_size']} must be > 0 and <= the resize size "
                              f"{prep['resize_size']} (the centre crop is taken from the resized image); fix "
                              f"--input-size or --resize-size")
    if given:
        origin += f", overridden: {', '.join(sorted(given))}"
    return prep, origin


# ------------------------------------------------------------------------------------------ reading
def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__


def read_checkpoint_file(path: str | os.PathLike, fmt: Format | None = None) -> Any:
    """The file's object, loaded without running any of its code (weights_only / safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file; pass the checkpoint file itself")
    if path.suffix == ".safetensors":
        from zoo.load import load_state_dict_file

        return load_state_dict_file(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"it pickles {found.group(1)}" if found else f"it needs a pickle feature weights_only refuses " \
                                                            f"({_one_line(e)})"
        how = fmt.resave if fmt is not None else _RESAVE_STATE.format(
            what="state dict", how="torch.save(obj.state_dict(), 'plain.pt')")
        raise ConversionError(
            f"refused {path}: loading it would run arbitrary code ({what}; ssl-zoo loads checkpoints with "
            f"torch.load(weights_only=True) only); {how}, then convert that file") from None
    except Exception as e:  # truncated zip, not a torch file at all, ...
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: "
                              f"{_one_line(e)}); pass the file the training code saved") from e


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def select_state_dict(obj: Any, fmt: Format, source: str) -> tuple[dict[str, torch.Tensor], str | None, list[str]]:
    """(state dict, the top-level entry it came from or None, the top-level entries not read)."""
    if _is_state_dict(obj):
        return dict(obj), None, []
    if not isinstance(obj, dict):
        raise ConversionError(f"{source} holds a {type(obj).__name__}, not a dict of tensors; a {fmt.name} "
                              f"checkpoint is a dict ({fmt.description})")
    for entry in fmt.containers:
        if entry in obj:
            state = obj[entry]
            if not isinstance(state, dict):
                raise ConversionError(f"{source}['{entry}'] is a {type(state).__name__}, not a state dict")
            bad = sorted(k for k, v in state.items() if not torch.is_tensor(v))
            if bad:
                raise ConversionError(f"{source}['{entry}'] holds non-tensor entries {', '.join(map(str, bad[:8]))}; "
                                      f"it is not a state dict")
            return dict(state), entry, sorted(str(k) for k in obj if k != entry)
    where = f"none of {', '.join(repr(c) for c in fmt.containers)}" if fmt.containers else "not a state dict"
    raise ConversionError(f"{source} holds entries {', '.join(sorted(map(str, obj))[:12])}: {where} "
                          f"({fmt.name}: {fmt.description}); is it a {fmt.name} checkpoint? `zoo convert --help` "
                          f"lists the formats")
