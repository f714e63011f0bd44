"""`zoo export` (checkpoint -> model_cards/NAME/, the Hub repository's exact content) and `zoo publish`.

Export writes into a temp folder beside the destination and renames it into place only when every
file is written and checked (ONNX parity, a reload through `zoo.load`), so an interrupted export
leaves no half-written folder; only then is the registry row (`zoo/pretrained.json`) updated.
Publish uploads such a folder with huggingface_hub (`create_repo(exist_ok=True)` + `upload_folder`);
the token comes from huggingface_hub's usual sources (HF_TOKEN, `hf auth login`) and is never printed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from export.checkpoint import ExportError, is_exported_folder, read_exported
from zoo.checkpoint import (RESULTS_FILE, CheckpointError, Results, TrainedCheckpoint, combine_results,
                            read_checkpoint, read_results)
from zoo.safetensors_io import FORMAT_VERSION, load_backbone, read_metadata, same_weights_file, save_backbone
from zoo.fsutil import atomic_write_text, replace_folder
from zoo.errors import ZooError
from zoo.registry import UnknownDatasetError, get_dataset

log = logging.getLogger("export")

WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
REPO_FILES = (WEIGHTS_FILE, CONFIG_FILE, ONNX_FILE, CARD_FILE)

N_RANDOM = 17  # checked in batches of 16: 16 + 1, so a batch of one runs too (dynamic batch axis)
N_REAL = 64


def _full_spec(name: str) -> Any:
    """The registry row `name`, which must be a full `{method}-{arch}.{tag}` name."""
    from zoo.registry import get_spec, registry

    spec = get_spec(name)  # unknown names fail here with a suggestion
    if spec.name != name or name not in registry():
        raise ExportError(f"export needs a full registry name, e.g. {spec.name!r} for {name!r}; `zoo list` lists them")
    return spec


def check_compatible(spec: Any, ckpt: TrainedCheckpoint) -> None:
    """The checkpoint must have been trained as the registry row says (arch, method, dataset tag)."""
    if ckpt.arch != spec.arch:
        raise ExportError(f"{ckpt.path} was trained with arch {ckpt.arch!r} but {spec.name} is {spec.arch!r}; export "
                          f"it under a {ckpt.arch} name ({spec.method}-{ckpt.arch}.{spec.tag})")
    if ckpt.method != spec.method:
        raise ExportError(f"{ckpt.path} was trained with method {ckpt.method!r} but {spec.name} is {spec.method!r}; "
                          f"export it under a {ckpt.method} name")
    try:
        tag: str | None = get_dataset(ckpt.dataset or "").tag
    except UnknownDatasetError:  # said below, with the registry row's tag
        tag = None
    if tag != spec.tag:
        raise ExportError(f"{ckpt.path} was trained on {ckpt.dataset!r} (tag {tag!r}) but {spec.name} is tagged "
                          f"{spec.tag!r}; export it under a .{tag} name")
    if ckpt.dataset == "synthetic":
        log.warning("%s was trained on synthetic images: its model card says so; do not publish it as %s",
                    ckpt.path, spec.name)


def parity_inputs(spec: Any) -> dict[str, torch.Tensor]:
    """Inputs for the ONNX check: random ones, and real images where the data is on this machine."""
    size = spec.input_size
    gen = torch.Generator().manual_seed(0)
    inputs = {"random": torch.randn(N_RANDOM, 3, size, size, generator=gen)}
    if spec.tag == "fmnist":
        from zoo.datasets import fashion_mnist_split
        from zoo.preprocess import Preprocess

        real = fashion_mnist_split("test", N_REAL)  # missing data: a one-line error naming the apt package
        inputs[real.name] = Preprocess.from_spec(spec)(real.images[:, None])
    else:  # no dataset here: images with the value range of real ones (uniform pixels, normalised)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
        std = torch.tensor(spec.std).view(1, 3, 1, 1)
        inputs["uniform-pixel"] = (torch.rand(N_RANDOM, 3, size, size, generator=gen) - mean) / std
    return inputs


def record_pretrained(name: str, entry: dict[str, Any]) -> None:
    """Write `entry` as `name`'s row in zoo/pretrained.json (atomically) and reload the registry."""
    from zoo import registry

    path = Path(registry.PRETRAINED_JSON)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = entry
    atomic_write_text(path, json.dumps(dict(sorted(data.items())), indent=2) + "\n")
    registry.reload()


def _clean_stale(parent: Path, name: str) -> None:
    """Temp folders of exports of `name` that were killed (SIGKILL skips every cleanup)."""
    for stale in parent.glob(f".{name}.export-*"):
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class ExportResult:
    folder: Path
    spec: Any
    parity: dict[str, tuple[int, float]]


def _read_given_results(results: str | os.PathLike) -> Results:
    measured = read_results(results)
    if measured.source is None:
        raise ExportError(f"results file {results} does not exist; pass the results.json the evaluation wrote, "
                          f"or omit --results to export without measured numbers")
    return measured


def _read_source(checkpoint: str | os.PathLike, spec: Any, results: str | os.PathLike | None,
                 fp16: bool) -> tuple[TrainedCheckpoint, Results, bool]:
    """(checkpoint, measured numbers, fp16) of what is exported: a training run or a folder `zoo export` wrote."""
    try:
        if is_exported_folder(checkpoint):  # re-card a shipped model: its numbers kept, new ones added
            ckpt, measured = read_exported(checkpoint)
            check_compatible(spec, ckpt)
            if read_metadata(ckpt.path).get("dtype") == "float16":
                fp16 = True  # a re-card keeps the published precision
            if results is not None:
                measured = combine_results(measured, _read_given_results(results))
        else:
            ckpt = read_checkpoint(checkpoint)
            check_compatible(spec, ckpt)
            measured = _read_given_results(results) if results is not None else \
                read_results(ckpt.path.parent / RESULTS_FILE)
    except CheckpointError as e:  # the library's reader: export's callers catch ExportError, as before
        raise ExportError(str(e)) from e
    return ckpt, measured, fp16


def write_onnx(model: torch.nn.Module, spec: Any, path: Path, opset: int, weights_dtype: str,
               atol: float) -> dict[str, tuple[int, float]]:
    """Export `model` to `path` and check it against PyTorch: input kind -> (number of inputs, max |diff|)."""
    from zoo import onnx as zoo_onnx

    zoo_onnx.export_onnx(model, path, spec.input_size, opset=opset, weights_dtype=weights_dtype)
    parity = {}
    for kind, inputs in parity_inputs(spec).items():
        batch = 16 if kind == "random" else 64
        parity[kind] = (int(inputs.shape[0]), zoo_onnx.check_onnx_parity(model, path, inputs, atol=atol,
                                                                          batch_size=batch))
    return parity


def export_model(checkpoint: str | os.PathLike, name: str, *, results: str | os.PathLike | None = None,
                 fp16: bool = False, out_dir: str | os.PathLike | None = None, opset: int = 17, atol: float = 1e-4,
                 force: bool = False, update_registry: bool = True, onnx_in_folder: bool = True) -> ExportResult:
    """Write `<out_dir or model_cards/>/<name>/` from a trainer checkpoint and record it in the registry.

    `checkpoint` may also be a folder written by `zoo export` (a shipped model whose run is gone): the
    card is rebuilt from its weights, its recipe file (checked against the recorded recipe hash) and its
    recorded numbers, with `results` adding or replacing measured numbers; weights whose tensors and
    metadata are unchanged keep their bytes and sha256.

    `results` is the evaluation's results.json (default: results.json beside the checkpoint; absent
    means "not measured"). `fp16` stores the weights in half precision (they load back as fp32).
    `onnx_in_folder=False` exports and checks the ONNX file but leaves it out of the folder (a large
    model kept out of git): config.json and the card say it is built on first use, and `zoo publish`
    builds it from the weights, with the same check, before uploading.
    """
    from export.card import ExportFacts, build_card
    from zoo.backbones import create_backbone
    from zoo.hub import model_cards_dir, sha256_file
    from zoo.load import load, load_weights_into

    spec = _full_spec(name)
    ckpt, measured, fp16 = _read_source(checkpoint, spec, results, fp16)
    if is_exported_folder(checkpoint) and onnx_built_on_first_use(_read_config(Path(checkpoint))):
        onnx_in_folder = False  # a re-card keeps the folder's choice, as it keeps its precision
    model = create_backbone(spec.arch)
    load_weights_into(model, ckpt.backbone, str(ckpt.path))  # strict: names every missing or mis-shaped key

    root = Path(out_dir) if out_dir is not None else model_cards_dir()
    final = root / name
    if final.exists() and not force:
        raise ExportError(f"{final} already exists; pass --force (force=True) to replace it")
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.export-", dir=root))
    try:
        dtype = "float16" if fp16 else "float32"
        weights = tmp / WEIGHTS_FILE
        save_backbone(model.state_dict(), weights, dtype=dtype,
                      metadata={"name": name, "arch": spec.arch, "method": spec.method,
                                "recipe_hash": ckpt.recipe_hash})
        previous = final / WEIGHTS_FILE
        if previous.is_file() and same_weights_file(previous, weights):
            shutil.copyfile(previous, weights)  # same tensors and metadata: keep the published bytes and sha256
        sha = sha256_file(weights)

        # Everything downstream is checked against what the file holds (fp16 rounding included).
        published = create_backbone(spec.arch)
        state, _ = load_backbone(weights)
        load_weights_into(published, state, str(weights))
        published.eval()
        published.spec = spec

        onnx_path = tmp / ONNX_FILE
        parity = write_onnx(published, spec, onnx_path, opset, dtype, atol)

        row = replace(spec, sha256=sha, metrics=dict(measured.metrics), train_minutes=measured.train_minutes,
                      has_weights=True,
                      extra={**spec.extra, "recipe_hash": ckpt.recipe_hash, "weights_dtype": dtype,
                             "format_version": FORMAT_VERSION, "steps": ckpt.step, "epochs": ckpt.epoch,
                             "monitor_knn": ckpt.monitor_knn, "results": measured.to_json(),
                             "onnx": {"file": ONNX_FILE, "opset": opset, "input": "images", "output": "features",
                                      "in_folder": onnx_in_folder, "atol": atol,
                                      "max_abs_diff": {k: v[1] for k, v in parity.items()}}})
        (tmp / CONFIG_FILE).write_text(json.dumps(row.to_dict(), indent=2) + "\n")
        facts = ExportFacts(sha256=sha, weights_dtype=dtype, onnx_opset=opset, parity=parity,
                            weights_bytes=weights.stat().st_size, onnx_bytes=onnx_path.stat().st_size,
                            onnx_in_folder=onnx_in_folder)
        build_card(row, ckpt, measured, facts).save(tmp / CARD_FILE)
        if not onnx_in_folder:
            onnx_path.unlink()

        # The folder as users will load it: config.json's sha256 checked, strict keys, same features. The
        # registry row is recorded only after this check, so zoo.load's "not the registry's weights" note
        # would describe the moment, not the export: keep it out of the export's output.
        quiet = logging.getLogger("zoo")
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            reloaded = load(name, pretrained=tmp, device="cpu")
        finally:
            quiet.setLevel(level)
        probe = torch.randn(4, 3, spec.input_size, spec.input_size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            if not torch.equal(reloaded(probe), published(probe)):
                raise ExportError(f"{tmp} does not reload to the exported model; report this with the checkpoint")
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # also on Ctrl-C: never leave a half-written folder
        raise
    if update_registry:
        record_pretrained(name, {"sha256": sha, "metrics": dict(measured.metrics),
                                 "train_minutes": measured.train_minutes, "has_weights": True})
    log.debug("exported %s to %s (sha256 %s..., ONNX max |diff| %s)", name, final, sha[:12],
             ", ".join(f"{k} {v[1]:.1e}" for k, v in parity.items()))
    return ExportResult(folder=final, spec=row, parity=parity)


# ---------------------------------------------------------------- publish

def _with_onnx(folder: Path, config: dict[str, Any], staging: Path) -> Path:
    """A copy of `folder` in `staging` with the model.onnx its export left out, built from its weights and
    checked against PyTorch as the export checked it: the Hub repository gets every file the card lists."""
    from zoo.backbones import create_backbone
    from zoo.load import load_weights_into
    from zoo.registry import ModelSpec

    for f in REPO_FILES:
        if f != ONNX_FILE:
            shutil.copyfile(folder / f, staging / f)
    spec = ModelSpec.from_dict(config)
    onnx = config["extra"]["onnx"]
    model = create_backbone(spec.arch)
    state, _ = load_backbone(staging / WEIGHTS_FILE)
    load_weights_into(model, state, str(staging / WEIGHTS_FILE))
    model.eval()
    model.spec = spec  # the ONNX metadata carries its preprocessing, as at export
    log.info("building %s/%s from its weights before the upload", folder, ONNX_FILE)
    write_onnx(model, spec, staging / ONNX_FILE, int(onnx.get("opset", 17)),
               str(config["extra"].get("weights_dtype", "float32")), float(onnx.get("atol", 1e-4)))
    return staging


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class PublishResult:
    repo_id: str
    commit: str | None
    url: str | None


def onnx_built_on_first_use(config: dict[str, Any]) -> bool:
    """True when the export left model.onnx out of the folder (config.json's `extra.onnx.in_folder`)."""
    return (config.get("extra") or {}).get("onnx", {}).get("in_folder", True) is False


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{folder / CONFIG_FILE} is not valid JSON ({e}); export the model again") from e


def check_folder(folder: str | os.PathLike) -> dict[str, Any]:
    """A folder written by `zoo export`: every file present (model.onnx unless the export left it to be
    built on first use), weights matching config.json's sha256."""
    from zoo.hub import sha256_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass model_cards/NAME as written by `zoo export`")
    config = _read_config(folder) if (folder / CONFIG_FILE).is_file() else {}
    expected = [f for f in REPO_FILES if not (f == ONNX_FILE and onnx_built_on_first_use(config))]
    missing = [f for f in expected if not (folder / f).is_file()]
    if missing:
        raise ExportError(f"{folder} lacks {', '.join(missing)}; write it with `zoo export CHECKPOINT --name NAME` "
                          f"(or rebuild it from the folder's weights: `zoo export {folder} --name NAME --force`)")
    if not config.get("sha256") or sha256_file(folder / WEIGHTS_FILE) != config["sha256"]:
        raise ExportError(f"{folder / WEIGHTS_FILE} does not match the sha256 in {CONFIG_FILE}; export the model "
                          f"again before publishing")
    return config


def publish_folder(folder: str | os.PathLike, repo_id: str | None = None, *, private: bool = False,
                   revision: str | None = None, commit_message: str | None = None, token: str | bool | None = None,
                   endpoint: str | None = None) -> PublishResult:
    """Upload an exported folder to a Hub model repository (created if missing) and return the commit.

    `repo_id` defaults to config.json's `hub_repo`; `revision` is a branch (created from main if
    missing). `token` None uses huggingface_hub's usual sources.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    config = check_folder(folder)
    repo_id = repo_id or config.get("hub_repo")
    if not repo_id or not _REPO_ID.match(repo_id):
        raise ExportError(f"--repo-id must be ORG/NAME (e.g. {config.get('hub_repo') or 'ssl-zoo/' + folder.name}), "
                          f"got {repo_id!r}")
    if revision is not None and (_COMMIT.match(revision) or not revision.strip()):
        raise ExportError(f"--revision must be a branch name to commit to, got {revision!r}")
    if config.get("hub_repo") and repo_id != config["hub_repo"]:
        log.warning("publishing %s to %s: zoo.load(%r) pulls from %s; pass pretrained=PATH or publish there",
                    config.get("name"), repo_id, config.get("name"), config["hub_repo"])
    from zoo.hub import hub_offline

    if hub_offline():
        raise ZooError(f"cannot publish {folder}: HF_HUB_OFFLINE=1 is set; unset it (and connect) to publish")
    # Built per call, so the endpoint is read now (HF_ENDPOINT / constants.ENDPOINT), not at import time.
    api = HfApi(endpoint=endpoint, token=token)
    staging, upload_dir = None, folder
    if onnx_built_on_first_use(config) and not (folder / ONNX_FILE).is_file():
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.publish-"))
        try:
            upload_dir = _with_onnx(folder, config, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id, folder_path=upload_dir, revision=revision, repo_type="model",
            allow_patterns=list(REPO_FILES),  # only the exported files, never stray temp or editor files
            commit_message=commit_message or f"Publish {config.get('name', folder.name)} "
                                             f"(sha256 {config['sha256'][:12]})")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", "?")
        hint = ("log in with `hf auth login` or set HF_TOKEN to a token with write access"
                if status in (401, 403) else "check the repo id and your network, then retry")
        raise ZooError(f"publishing {folder} to {repo_id} failed (HTTP {status}: "
                       f"{(str(e).splitlines() or [''])[0][:160]}); {hint}") from None
    except Exception as e:  # no network, DNS, refused connection, timeouts: one line, not the client's traceback
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ZooError(f"publishing {folder} to {repo_id} failed: the Hub ({api.endpoint}) cannot be reached "
                       f"({type(e).__name__}: {reason}); check your network or HF_ENDPOINT, then retry") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    commit = getattr(info, "oid", None)
    return PublishResult(repo_id=repo_id, commit=commit, url=getattr(info, "commit_url", None))
