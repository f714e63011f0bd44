"""`zoo convert`: a checkpoint written by another project's code -> a folder `zoo.load` and `zoo export` take.

    zoo.convert("latest_model.pth", "groco", arch="resnet50", out="converted/groco-r50", name="groco-resnet50.in1k")
    model = zoo.load("groco-resnet50.in1k", pretrained="converted/groco-r50")

The source side (each project's layout, one row of `zoo.convert_formats.FORMATS`, and reading its file
without running its code) is zoo/convert_formats.py; here every key is mapped and checked, and the
folder is written.

Strictness:

- Every key of the state dict is either kept, or dropped by a rule of the format's row (or by the
  caller's explicit `drop=` prefixes), and the report says how many each rule took. A key no rule
  covers, a backbone key the checkpoint lacks (except BatchNorm's `num_batches_tracked` counter,
  which old torchvision files do not have and evaluation does not read: set to 0 and reported) or a
  shape that does not fit `arch` is an error listing the keys, never skipped.
- The converted backbone is run on a fixed input (seeded) and its mean feature norm is reported;
  the written `model.safetensors` is loaded back and must give bit-identical features.

The output folder holds `model.safetensors` (ssl-zoo's weight format), `config.json` (the registry
row of `name` with the weights' sha256 and where they came from, `extra.converted_from`) and, when
`name` is given, `checkpoint.pt` in the trainer's format (`zoo.checkpoint.backbone_checkpoint`: a
recipe naming method, arch and dataset), which is what `zoo export` and `zoo eval --weights` read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from zoo.checkpoint import CHECKPOINT_FILE, backbone_checkpoint, save_checkpoint
from zoo.convert_formats import (PREPROCESSING, ConversionError, Format, get_format, preprocessing_for,
                                 read_checkpoint_file, select_state_dict)
from zoo.convert_keys import Prefixed, apply_prefixes, prefix_hint
from zoo.fsutil import replace_folder

BN_COUNTER = "num_batches_tracked"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROBE_SEED = 0
PROBE_BATCH = 2


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


def fit_to_arch(mapped: KeyMap, fmt: Format, arch: str, source: str,
                prefixed: Prefixed | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The backbone state for `arch`: every key accounted for, shapes checked; returns (state, filled keys).

    `prefixed` (the keys before the format's rules) lets an error name the --strip / --keep that fixes it.
    """
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
        hint = _missing_hint(mapped, unknown, fmt, own, prefixed) if missing else \
            "pass drop=[PREFIX] (--drop PREFIX) for parts that are not the backbone"
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
                              + (f"its shapes fit {', '.join(fits)}: pass --arch {fits[0]}" if fits
                                 else "no ssl-zoo arch has its shapes"))
    state = dict(mapped.state)
    for k in filled:
        state[k] = torch.zeros_like(own[k])
    return state, filled


def _missing_hint(mapped: KeyMap, unknown: list[str], fmt: Format, own: dict[str, torch.Tensor],
                  prefixed: Prefixed | None) -> str:
    """The flag that fixes missing backbone keys: --strip / --keep when the keys sit under another prefix,
    --arch when the file's keys are another arch's, --from when nothing of the format's layout is there."""
    if prefixed is not None and unknown:
        def converts(strip: Sequence[str], keep: str | None) -> bool:  # every key accounted for, none missing
            try:
                m = map_keys(apply_prefixes(prefixed.state, _no_wrappers(fmt), strip, keep).state, fmt)
            except ConversionError:
                return False
            return not m.unknown and set(m.state) <= set(own) and \
                all(k in m.state for k in own if not k.endswith(BN_COUNTER))

        hint = prefix_hint(unknown, converts)
        if hint:
            return hint
    if not mapped.state:
        return (f"no key is under the {fmt.name} layout's prefixes: pass the --from format that wrote the file, "
                f"or --keep PREFIX of its backbone")
    fits = _fitting_archs(mapped.state)
    return f"its keys fit {', '.join(fits)}: pass --arch {fits[0]}" if fits else \
        "pass the --arch the checkpoint was trained with"


def _no_wrappers(fmt: Format) -> Format:
    from dataclasses import replace

    return replace(fmt, wrappers=())  # already stripped once


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
    stripped: dict[str, int] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def report(self) -> list[str]:
        where = f"{self.source}['{self.container}']" if self.container else str(self.source)
        dropped = ", ".join(f"{p}* ({n})" for p, n in self.dropped.items()) or "none"
        lines = [f"converted {self.source} ({self.format}) -> {self.out} ({self.arch})",
                 f"  encoder kept: {self.encoder}",
                 f"  read {where}" + (f"; not read: {', '.join(self.not_read)}" if self.not_read else ""),
                 "  prefixes stripped: " + (", ".join(f"{p} ({n})" for p, n in self.stripped.items()) or "none"),
                 "  preprocessing: " + ", ".join(f"{k} {v}" for k, v in self.preprocessing.items()),
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
                         f"convert with --name NAME to also write {CHECKPOINT_FILE} for `zoo export`")
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
            *, name: str | None = None, drop: Sequence[str] = (), strip: Sequence[str] = (),
            keep: str | None = None, input_size: int | None = None, resize_size: int | None = None,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            interpolation: str | None = None, force: bool = False, verbose: bool = True) -> Conversion:
    """Convert another project's checkpoint into a folder `zoo.load(name, pretrained=out)` and `zoo export` take.

    `fmt` is a row of `FORMATS`: groco, wmse, isd, equimod, solo-learn, lightly, torchvision, timm. The
    encoder kept where a file holds several is the one the method's paper / code evaluates (each row's
    `encoder` says which: the online encoder for W-MSE, EquiMod, solo-learn; ISD's student `encoder_q`;
    GroCo's single encoder; lightly's `backbone`). `arch` is an ssl-zoo arch (`zoo.ARCHS`); `name`, a
    full registry name (`{method}-{arch}.{tag}`), fixes the arch and makes the folder exportable (it
    then also holds a trainer-format `checkpoint.pt`). `drop` adds key prefixes to drop (parts of the
    method the format's row does not know). Wrapper levels (`module.`, `_orig_mod.`, `model.`) are removed
    first; `strip` removes more prefixes, `keep` keeps only the keys under a prefix and reads them as the
    format's backbone (e.g. `keep="student_backbone."`). config.json records the arch and the preprocessing
    (`input_size`, `resize_size`, `mean`, `std`, `interpolation`; see `preprocessing_for`, each overridable
    here) that `zoo.load` then uses. `out` must not exist unless `force`. Prints the report (`verbose`) and
    returns it as a `Conversion`.
    """
    from zoo.backbones import create_backbone, get_arch
    from zoo.hub import sha256_file
    from zoo.load import load_state_dict_file, load_weights_into
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
    if form.small_stem_refusal and arch_spec.small_stem:
        raise ConversionError(f"--arch {arch}: {form.small_stem_refusal}")
    prep, prep_origin = preprocessing_for(form, arch, spec, dict(
        input_size=input_size, resize_size=resize_size, mean=mean, std=std, interpolation=interpolation))
    if out is None:
        raise ConversionError("pass the output folder (--out DIR)")
    source, final = Path(checkpoint), Path(out)
    if final.exists() and not force:
        raise ConversionError(f"{final} already exists; pass --force (force=True) to replace it")

    obj = read_checkpoint_file(source, form)
    state, container, not_read = select_state_dict(obj, form, str(source))
    prefixed = apply_prefixes(state, form, strip, keep)
    mapped = map_keys(prefixed.state, form, drop)
    if prefixed.outside_keep:
        mapped.dropped[f"not under --keep {keep}"] = prefixed.outside_keep
    backbone_state, filled = fit_to_arch(mapped, form, arch, str(source), prefixed)
    encoder = prefixed.encoder or form.encoder

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
                      "encoder": encoder, "arch": arch, "kept": len(mapped.kept), "stripped": dict(prefixed.stripped),
                      "dropped": dict(mapped.dropped), "filled": filled, "layout_source": form.source,
                      "preprocessing": prep_origin}
        weights = save_backbone(model.state_dict(), tmp / WEIGHTS_FILE,
                                metadata={"arch": arch, "converted_from": form.name, "source_sha256": source_sha,
                                          **({"name": name} if name else {})})
        sha = sha256_file(weights)
        # Nobody measured these bytes: no metrics, recipe or minutes; zoo.load takes arch and preprocessing from here.
        if spec is not None:
            config = {**spec.to_dict(), **prep, "sha256": sha, "has_weights": True, "metrics": {},
                      "train_minutes": None, "recipe": "", "extra": {**spec.extra, "converted_from": provenance}}
        else:  # no registry row: only what holds whatever name (of this arch) it is loaded under
            config = {"arch": arch, **prep, "sha256": sha, "weights_file": WEIGHTS_FILE,
                      "extra": {"converted_from": provenance}}
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        if spec is not None:
            recipe = {"method": {"name": spec.method}, "model": {"arch": arch},
                      "data": {"dataset": get_dataset(spec.tag).trainer}, "converted_from": provenance}
            save_checkpoint(backbone_checkpoint(model.state_dict(), recipe), tmp / CHECKPOINT_FILE)

        # The written file, loaded back as users will: strict keys, identical features.
        reloaded = create_backbone(arch)
        load_weights_into(reloaded, load_state_dict_file(weights), str(weights))
        checks = [reloaded.eval()]
        if spec is not None:
            from zoo.load import load

            loaded = load(name, pretrained=tmp, device="cpu")
            if {k: getattr(loaded.spec, k) for k in PREPROCESSING} != {**{k: prep[k] for k in PREPROCESSING},
                                                                       "mean": tuple(prep["mean"]),
                                                                       "std": tuple(prep["std"])}:
                raise ConversionError(f"zoo.load({name!r}, pretrained=...) does not take the converted folder's "
                                      f"preprocessing; report this")
            checks.append(loaded)
        with torch.no_grad():
            for m in checks:
                if not torch.equal(m(probe), features):
                    raise ConversionError(f"{weights} does not reload to the converted backbone; report this with "
                                          f"the checkpoint")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    notes = [f"preprocessing from {prep_origin}"]
    result = Conversion(out=final, format=form.name, arch=arch, name=name, encoder=encoder, source=source,
                        container=container, not_read=not_read, kept=len(mapped.kept), dropped=dict(mapped.dropped),
                        filled=filled, feature_norm=norm, probe_shape=tuple(probe.shape), sha256=sha, notes=notes,
                        stripped=dict(prefixed.stripped), preprocessing=prep)
    if verbose:
        print("\n".join(result.report()))
    return result


class _CallableModule(type(sys)):
    """`zoo.convert` is both this module and the function (as `zoo.embed`): calling either converts."""

    def __call__(self, *args: Any, **kwargs: Any) -> Conversion:
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
