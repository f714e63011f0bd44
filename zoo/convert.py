"""`zoo convert`: a checkpoint written by another project's code -> a folder `zoo.load` and `zoo export` take.

    zoo.convert("latest_model.pth", "groco", arch="resnet50", out="converted/groco-r50", name="groco-resnet50.in1k")
    model = zoo.load("groco-resnet50.in1k", pretrained="converted/groco-r50")

Each format is one row of `FORMATS` (data, not code): which top-level entry of the file holds the
state dict, which key prefix is the backbone to keep (and what it becomes: torchvision ResNet names,
ssl-zoo's `Backbone` layout), which prefixes are the other parts of the method (projector, predictor,
momentum / teacher copies, queues, classifier) that are dropped, and which encoder is kept and why.

Safety and strictness:

- Files are read with `torch.load(..., weights_only=True)` only (or safetensors). A checkpoint that
  pickles anything beyond tensors, containers and plain values is refused with a one-line message
  naming the class and how to re-save it. `argparse.Namespace` (the `opt` / `args` entry ISD and
  timm's trainer store) is the one class allowed in: it only restores attributes, runs no code.
- Every key of the state dict is either kept, or dropped by a rule of the format's row (or by the
  caller's explicit `drop=` prefixes), and the report says how many each rule took. A key no rule
  covers, a backbone key the checkpoint lacks (except BatchNorm's `num_batches_tracked` counter,
  which old torchvision files do not have and evaluation does not read: set to 0 and reported) or a
  shape that does not fit `arch` is an error listing the keys, never skipped.
- The converted backbone is run on a fixed input (seeded) and its mean feature norm is reported;
  the written `model.safetensors` is loaded back and must give bit-identical features.

The output folder holds `model.safetensors` (ssl-zoo's weight format), `config.json` (the registry
row of `name` with the weights' sha256 and where they came from, `extra.converted_from`) and, when
`name` is given, `checkpoint.pt` in the trainer's format (`method` state with `backbone.*` keys and
a recipe naming method, arch and dataset), which is what `zoo export` and `zoo eval --weights` read.

Layouts were read from each project's own code (files and commits in the rows' `source`); the
code is not copied here.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.fsutil import replace_folder
from zoo.errors import UnknownNameError, ZooError, closest

BN_COUNTER = "num_batches_tracked"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_CHECKPOINT = "checkpoint.pt"
# Classes a checkpoint may contain besides tensors and plain containers (weights_only allowlist).
SAFE_GLOBALS = (argparse.Namespace,)
PROBE_SEED = 0
PROBE_BATCH = 2


class ConversionError(ZooError, ValueError):
    """A checkpoint that cannot be converted as asked (unsafe pickle, unknown/missing keys, wrong arch)."""


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
    small_stem_note: str = ""  # printed when converting to a 3x3-stem (CIFAR/STL) arch


_RESAVE_STATE = "load it where its code is importable and save the {what} alone: {how}"

FORMATS: dict[str, Format] = {f.name: f for f in [
    Format(
        "groco", "GroCo authors' checkpoints (latest_model.pth, checkpoint-epochN.pth)",
        "github.com/ninatu/learning_by_sorting@47c074e: base/base_trainer.py _save_checkpoint, "
        "models/encoder/regular_encoder.py (torchvision ResNet as `.encoder`, fc = Identity, DDP `module.`)",
        containers=("encoder",),
        keep=(("module.encoder.", ""), ("encoder.", "")),
        drop=(),
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
        keep=(("model.module.", ""), ("model.", "")),
        drop=("head.", "whitening.", "model_t.", "head_t.", "pred.", "bn_last."),
        encoder="`model` (the encoder E: test.py evaluates model_full.model); the projection `head`, W-MSE's "
                "`whitening`, and BYOL's target copy `model_t` / `head_t` and predictor `pred` are dropped",
        resave=_RESAVE_STATE.format(what="state dict", how="torch.save(model.state_dict(), 'wmse.pt')"),
    ),
    Format(
        "isd", "UMBCvision/ISD checkpoints (ckpt_epoch_N.pth: opt, state_dict, optimizer, epoch)",
        "github.com/UMBCvision/ISD@4bdd603: train_isd.py / train_isd_plus.py ISD module (encoder_q / encoder_k "
        "wrapped in nn.DataParallel, predict_q, queue buffers), eval_knn.py / eval_linear.py keep encoder_q",
        containers=("state_dict", "model"),
        keep=(("encoder_q.module.", ""), ("encoder_q.", "")),
        drop=("encoder_q.module.fc.", "encoder_q.fc.", "encoder_k.", "predict_q.", "queue", "labels"),
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
        keep=(("module.resnet.", ""), ("resnet.", "")),
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
        drop=("momentum_backbone.", "projector.", "momentum_projector.", "predictor.", "classifier.",
              "momentum_classifier.", "head.", "momentum_head.", "prototypes.", "queue", "whitening.",
              "transformer_encoder.", "decoder", "mask_token"),
        encoder="`backbone` (the online network: what solo-learn's main_knn.py, main_linear.py and online "
                "classifier evaluate); `momentum_backbone` and the projector / predictor / heads / queues are "
                "dropped",
        resave=_RESAVE_STATE.format(what="state dict",
                                    how="torch.save(torch.load(path, weights_only=False)['state_dict'], 'solo.pt')"),
        small_stem_note="solo-learn's CIFAR stem is a 3x3 conv with padding 2 (solo/methods/base.py), ssl-zoo's "
                        "3x3 stems pad by 1: the weights fit, but the features are not solo-learn's own for CIFAR "
                        "models (ImageNet-stem models are identical)",
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
        keep=(("module.", ""), ("", "")),
        drop=("fc.", "module.fc."),
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


# ------------------------------------------------------------------------------------------ mapping
@dataclass
class KeyMap:
    """What happened to every key of the source state dict."""

    state: dict[str, torch.Tensor]  # backbone keys -> tensors
    kept: dict[str, str]  # backbone key -> source key
    dropped: Counter  # rule prefix -> number of keys
    unknown: list[str]  # source keys no rule covers


def map_keys(state: dict[str, torch.Tensor], fmt: Format, drop: Sequence[str] = ()) -> KeyMap:
    """Apply the format's drop rules, then its keep rules, to every key (nothing is skipped silently)."""
    drops = tuple(fmt.drop) + tuple(drop)
    out: dict[str, torch.Tensor] = {}
    kept: dict[str, str] = {}
    dropped: Counter = Counter()
    unknown: list[str] = []
    for key, value in state.items():
        rule = next((p for p in drops if key.startswith(p)), None)
        if rule is not None:
            dropped[rule] += 1
            continue
        rename = next(((src, dst) for src, dst in fmt.keep if key.startswith(src)), None)
        if rename is None:
            unknown.append(key)
            continue
        new = rename[1] + key[len(rename[0]):]
        if new in kept:
            raise ConversionError(f"{key} and {kept[new]} both map to backbone key {new}; the file mixes two "
                                  f"layouts of the {fmt.name} format")
        out[new], kept[new] = value, key
    return KeyMap(out, kept, dropped, unknown)


def _few(keys: Sequence[str], n: int = 12) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def _fitting_archs(state: dict[str, torch.Tensor]) -> list[str]:
    """Archs whose backbone has exactly these keys and shapes (for the error's hint)."""
    from zoo.backbones import ARCHS, create_backbone

    fits = []
    for arch in ARCHS:
        own = create_backbone(arch).state_dict()
        core = {k for k in own if not k.endswith(BN_COUNTER)}
        if core <= set(state) and set(state) <= set(own) and all(state[k].shape == own[k].shape for k in core):
            fits.append(arch)
    return fits


def fit_to_arch(mapped: KeyMap, fmt: Format, arch: str, source: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone state for `arch`: every key accounted for, shapes checked; returns (state, filled keys)."""
    from zoo.backbones import create_backbone

    own = create_backbone(arch).state_dict()
    unexpected = sorted(k for k in mapped.state if k not in own)
    unknown = mapped.unknown + [mapped.kept[k] for k in unexpected]
    missing = sorted(k for k in own if k not in mapped.state)
    filled = [k for k in missing if k.endswith(BN_COUNTER)]
    missing = [k for k in missing if not k.endswith(BN_COUNTER)]
    if unknown or missing:
        parts = []
        if unknown:
            parts.append(f"{len(unknown)} key(s) no {fmt.name} rule covers: {_few(unknown)}")
        if missing:
            parts.append(f"{len(missing)} {arch} key(s) missing: {_few(missing)}")
        hint = ("pass drop=[PREFIX] (--drop PREFIX) for parts that are not the backbone" if unknown and not missing
                else "check --from and --arch")
        if any(".shortcut." in k for k in unknown):
            hint = "lightly's ResNetGenerator layout (shortcut, linear) is not a torchvision ResNet: not supported"
        elif any(re.match(r"(module\.)?conv1\.\d+\.", k) for k in unknown):
            hint = "a deep-stem ResNet (timm resnet*c/d/s, conv1.0-6) does not fit a torchvision arch"
        raise ConversionError(f"{source} ({fmt.name}) does not convert to {arch}: {'; '.join(parts)}; {hint}")
    wrong = [f"{k} {tuple(mapped.state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in mapped.state and mapped.state[k].shape != own[k].shape]
    if wrong:
        fits = _fitting_archs(mapped.state)
        raise ConversionError(f"{source} ({fmt.name}) does not fit arch {arch}: shape mismatch {_few(wrong, 4)}; "
                              + (f"its shapes fit {', '.join(fits)}" if fits else "no ssl-zoo arch has its shapes"))
    state = dict(mapped.state)
    for k in filled:
        state[k] = torch.zeros_like(own[k])
    return state, filled


# ------------------------------------------------------------------------------------------ result
@dataclass
class Conversion:
    """What `convert` did; `report()` is the text the CLI prints."""

    out: Path
    format: str
    arch: str
    name: str | None
    encoder: str
    source: Path
    container: str | None
    not_read: list[str]
    kept: int
    dropped: dict[str, int]
    filled: list[str]
    feature_norm: float
    probe_shape: tuple[int, ...]
    sha256: str
    notes: list[str] = field(default_factory=list)

    def report(self) -> list[str]:
        where = f"{self.source}['{self.container}']" if self.container else str(self.source)
        dropped = ", ".join(f"{p}* ({n})" for p, n in self.dropped.items()) or "none"
        lines = [f"converted {self.source} ({self.format}) -> {self.out} ({self.arch})",
                 f"  encoder kept: {self.encoder}",
                 f"  read {where}" + (f"; not read: {', '.join(self.not_read)}" if self.not_read else ""),
                 f"  keys: {self.kept} kept as backbone, {sum(self.dropped.values())} dropped by rule "
                 f"[{dropped}], 0 unused: every key accounted for",
                 f"  check: features of a fixed input {list(self.probe_shape)} (randn, seed {PROBE_SEED}): mean L2 "
                 f"norm {self.feature_norm:.4f}; {WEIGHTS_FILE} reloads to bit-identical features"]
        if self.filled:
            lines.append(f"  filled {len(self.filled)} BatchNorm {BN_COUNTER} counter(s) absent from the file with 0 "
                         f"(not used in evaluation)")
        lines += [f"  note: {n}" for n in self.notes]
        if self.name:
            lines.append(f"  load: zoo.load({self.name!r}, pretrained={str(self.out)!r}); export: "
                         f"zoo export {self.out} --name {self.name}")
        else:
            lines.append(f"  load: zoo.load(NAME, pretrained={str(self.out)!r}) with a NAME of arch {self.arch}; "
                         f"convert with --name NAME to also write {TRAINER_CHECKPOINT} for `zoo export`")
        return lines


def _probe_input(arch: str, spec: Any) -> torch.Tensor:
    from zoo.backbones import get_arch
    from zoo.registry import registry

    if spec is not None:
        size = spec.input_size
    else:  # the input size of a registry row of this arch, else the stem's usual one
        size = next((s.input_size for s in registry().values() if s.arch == arch),
                    32 if get_arch(arch).small_stem else 224)
    return torch.randn(PROBE_BATCH, 3, size, size, generator=torch.Generator().manual_seed(PROBE_SEED))



def convert(checkpoint: str | os.PathLike, fmt: str, arch: str | None = None, out: str | os.PathLike | None = None,
            *, name: str | None = None, drop: Sequence[str] = (), force: bool = False,
            verbose: bool = True) -> Conversion:
    """Convert another project's checkpoint into a folder `zoo.load(name, pretrained=out)` and `zoo export` take.

    `fmt` is a row of `FORMATS`: groco, wmse, isd, equimod, solo-learn, lightly, torchvision, timm. The
    encoder kept where a file holds several is the one the method's paper / code evaluates (each row's
    `encoder` says which: the online encoder for W-MSE, EquiMod, solo-learn; ISD's student `encoder_q`;
    GroCo's single encoder; lightly's `backbone`). `arch` is an ssl-zoo arch (`zoo.ARCHS`); `name`, a
    full registry name (`{method}-{arch}.{tag}`), fixes the arch and makes the folder exportable (it
    then also holds a trainer-format `checkpoint.pt`). `drop` adds key prefixes to drop (parts of the
    method the format's row does not know). `out` must not exist unless `force`. Prints the report
    (`verbose`) and returns it as a `Conversion`.
    """
    from zoo.backbones import create_backbone, get_arch
    from zoo.hub import sha256_file
    from zoo.load import load_state_dict_file, load_weights_into
    from zoo.provenance import config_hash
    from zoo.registry import get_dataset, get_spec, registry
    from zoo.safetensors_io import save_backbone

    form = get_format(fmt)
    spec = None
    if name is not None:
        spec = get_spec(name)
        if spec.name != name or name not in registry():
            raise ConversionError(f"name must be a full registry name, e.g. {spec.name!r} for {name!r} "
                                  f"(`zoo list` lists them)")
        if arch is not None and arch != spec.arch:
            raise ConversionError(f"{name} is arch {spec.arch!r}, not {arch!r}; pass --arch {spec.arch} or a name "
                                  f"of arch {arch}")
        arch = spec.arch
    if arch is None:
        raise ConversionError("pass the arch the checkpoint was trained with (--arch, e.g. resnet50), or --name")
    arch_spec = get_arch(arch)
    if out is None:
        raise ConversionError("pass the output folder (--out DIR)")
    source, final = Path(checkpoint), Path(out)
    if final.exists() and not force:
        raise ConversionError(f"{final} already exists; pass --force (force=True) to replace it")

    obj = read_checkpoint_file(source, form)
    state, container, not_read = select_state_dict(obj, form, str(source))
    mapped = map_keys(state, form, drop)
    backbone_state, filled = fit_to_arch(mapped, form, arch, str(source))

    model = create_backbone(arch)
    load_weights_into(model, backbone_state, str(source))
    model.eval()
    probe = _probe_input(arch, spec)
    with torch.no_grad():
        features = model(probe)
    if not bool(torch.isfinite(features).all()):
        raise ConversionError(f"{source} converted to {arch} gives non-finite features on a fixed input; the "
                              f"weights or BatchNorm statistics are broken (or --arch is wrong)")
    norm = float(features.norm(dim=1).mean())

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.convert-", dir=final.parent))
    try:
        source_sha = sha256_file(source)
        provenance = {"format": form.name, "file": source.name, "sha256": source_sha, "entry": container,
                      "encoder": form.encoder, "arch": arch, "kept": len(mapped.kept),
                      "dropped": dict(mapped.dropped), "filled": filled, "layout_source": form.source}
        weights = save_backbone(model.state_dict(), tmp / WEIGHTS_FILE,
                                metadata={"arch": arch, "converted_from": form.name, "source_sha256": source_sha,
                                          **({"name": name} if name else {})})
        sha = sha256_file(weights)
        if spec is not None:
            config = {**spec.to_dict(), "sha256": sha, "has_weights": True, "metrics": {}, "train_minutes": None,
                      "extra": {**spec.extra, "converted_from": provenance}}
        else:  # no registry row: only what holds whatever name it is loaded under
            config = {"sha256": sha, "weights_file": WEIGHTS_FILE, "extra": {"converted_from": provenance}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if spec is not None:
            recipe = {"method": {"name": spec.method}, "model": {"arch": arch},
                      "data": {"dataset": get_dataset(spec.tag).trainer}, "converted_from": provenance}
            torch.save({"method": {f"backbone.{k}": v for k, v in model.state_dict().items()},
                        "recipe_json": json.dumps(recipe, sort_keys=True), "recipe_hash": config_hash(recipe),
                        "history": "[]", "step": 0, "epoch": 0}, tmp / TRAINER_CHECKPOINT)

        # The written file, loaded back as users will: strict keys, identical features.
        reloaded = create_backbone(arch)
        load_weights_into(reloaded, load_state_dict_file(weights), str(weights))
        checks = [reloaded.eval()]
        if spec is not None:
            from zoo.load import load

            checks.append(load(name, pretrained=tmp, device="cpu"))
        with torch.no_grad():
            for m in checks:
                if not torch.equal(m(probe), features):
                    raise ConversionError(f"{weights} does not reload to the converted backbone; report this with "
                                          f"the checkpoint")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    notes = [form.small_stem_note] if form.small_stem_note and arch_spec.small_stem else []
    result = Conversion(out=final, format=form.name, arch=arch, name=name, encoder=form.encoder, source=source,
                        container=container, not_read=not_read, kept=len(mapped.kept), dropped=dict(mapped.dropped),
                        filled=filled, feature_norm=norm, probe_shape=tuple(probe.shape), sha256=sha, notes=notes)
    if verbose:
        print("\n".join(result.report()))
    return result


class _CallableModule(type(sys)):
    """`zoo.convert` is both this module and the function (as `zoo.embed`): calling either converts."""

    def __call__(self, *args: Any, **kwargs: Any) -> Conversion:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
