"""Read what a training run left: the trainer's `checkpoint.pt` and the evaluation's `results.json`.

Checkpoint (written by `training.trainer`, read with `torch.load(weights_only=True)`, never unpickled
beyond tensors and plain types): `method` is the method's state dict, whose backbone keys start with
`backbone.`; `recipe_json` / `recipe_hash` the resolved recipe and its sha256; `history` a JSON list
of per-epoch records (`knn_top1` from the k-NN monitor); `step`, `epoch`.

`results.json` (written by the evaluation step, beside the checkpoint by default) holds the measured
numbers the model card and registry report. Every field is optional; a metric that is absent is
"not measured", never guessed:

    {
      "knn_k20": 85.3,          # weighted k-NN top-1 %, k=20, T=0.07, cosine (train split bank, test split queries)
      "knn_k200": 84.1,         # the same with k=200
      "knn5_majority": 84.7,    # 5-NN majority vote top-1 %
      "linear": 88.9,           # linear probe top-1 % on frozen features
      "protocol": "...",        # one paragraph: splits, input size, probe optimiser/epochs
      "train_minutes": 28.5,    # wall-clock minutes of the training run
      "hardware": "2 CPU cores" # where it was trained (free text)
    }

Label-efficient transfer numbers (`zoo eval linear --labels`, `zoo eval finetune`, zoo/transfer.py) add
keys `linear_<p>pct` / `finetune_<p>pct` (`linear_1pct`, `finetune_10pct`, ...; top-1 %) and
`transfer_protocols`, `{key: one paragraph}` saying how each was measured.

k-NN numbers under other projects' protocols (`zoo eval knn --protocol NAME`, `zoo.knn.KNN_PROTOCOLS`) add
keys `knn_<protocol>_k<k>` (`knn_dinov2_k10`, `knn_lightly_k200`, ...; top-1 %); the card names each protocol.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.provenance import config_hash

log = logging.getLogger("export")

CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
BACKBONE_PREFIX = "backbone."

# results.json metric keys -> what each measures (the card's table rows, the model-index entries).
METRICS: dict[str, str] = {
    "knn_k20": "weighted k-NN top-1 (k=20, T=0.07, cosine)",
    "knn_k200": "weighted k-NN top-1 (k=200, T=0.07, cosine)",
    "knn5_majority": "5-NN majority-vote top-1 (Euclidean)",
    "linear": "linear probe top-1 (frozen features)",
}
_TEXT_FIELDS = ("protocol", "hardware")
TRANSFER_KEY = re.compile(r"^(linear|finetune)_(\d+(?:p\d+)?)pct$")  # written by zoo/transfer.py


class ExportError(ZooError, ValueError):
    """A checkpoint, results file or export request that cannot be exported as asked."""


@dataclass
class TrainedCheckpoint:
    """The parts of a trainer checkpoint that an export needs."""

    path: Path
    backbone: dict[str, torch.Tensor]
    recipe: dict[str, Any]
    recipe_hash: str
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    epoch: int = 0

    @property
    def arch(self) -> str | None:
        return (self.recipe.get("model") or {}).get("arch")

    @property
    def method(self) -> str | None:
        return (self.recipe.get("method") or {}).get("name")

    @property
    def dataset(self) -> str | None:
        return (self.recipe.get("data") or {}).get("dataset")

    @property
    def monitor_knn(self) -> float | None:
        """The last k-NN monitor value the trainer logged (a subset estimate, not the evaluation)."""
        for record in reversed(self.history):
            if isinstance(record, dict) and record.get("knn_top1") is not None:
                return float(record["knn_top1"])
        return None


def checkpoint_path(path: str | os.PathLike) -> Path:
    """`path` itself, or `path/checkpoint.pt` for a run folder."""
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_FILE
    if not p.is_file():
        raise ExportError(f"no checkpoint at {path}; pass a run folder written by `zoo train` or its {CHECKPOINT_FILE}")
    return p


def read_checkpoint(path: str | os.PathLike) -> TrainedCheckpoint:
    """The backbone state dict (prefix `backbone.` removed), recipe, hash and history of a trainer checkpoint."""
    p = checkpoint_path(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors of many kinds: one line with the cause
        raise ExportError(f"cannot read {p} as a trainer checkpoint ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160] if str(e) else ''}); pass the checkpoint.pt of a "
                          f"`zoo train` run") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("method"), dict):
        raise ExportError(f"{p} is not a `zoo train` checkpoint (no 'method' state dict); pass the checkpoint.pt of "
                          f"a training run, or load plain weights with zoo.load(name, pretrained=PATH)")
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["method"].items() if k.startswith(BACKBONE_PREFIX)}
    if not backbone:
        raise ExportError(f"{p} has no '{BACKBONE_PREFIX}*' keys in its method state; it was not written by "
                          f"ssl-zoo's trainer (expected method.backbone.conv1.weight, ...)")
    try:
        recipe = json.loads(ckpt.get("recipe_json") or "null")
        history = json.loads(ckpt.get("history") or "[]")
    except (TypeError, json.JSONDecodeError) as e:
        raise ExportError(f"{p} holds a malformed recipe_json or history ({e}); re-save it with `zoo train --resume`"
                          ) from e
    if not isinstance(recipe, dict):
        raise ExportError(f"{p} has no recipe (recipe_json); export needs the run's recipe: re-save the checkpoint "
                          f"with the current `zoo train`")
    recipe_hash = str(ckpt.get("recipe_hash") or config_hash(recipe))
    if recipe_hash != config_hash(recipe):
        log.warning("%s: recipe_hash %s... does not match its recipe_json (%s...); the recipe's own hash is used",
                    p, recipe_hash[:12], config_hash(recipe)[:12])
        recipe_hash = config_hash(recipe)
    return TrainedCheckpoint(path=p, backbone=backbone, recipe=recipe, recipe_hash=recipe_hash,
                             history=history if isinstance(history, list) else [],
                             step=int(ckpt.get("step", 0)), epoch=int(ckpt.get("epoch", 0)))


@dataclass
class Results:
    """Measured evaluation numbers; a missing metric is not measured."""

    metrics: dict[str, float] = field(default_factory=dict)
    protocol: str | None = None
    train_minutes: float | None = None
    hardware: str | None = None
    source: Path | None = None
    transfer: dict[str, float] = field(default_factory=dict)  # linear_10pct, finetune_1pct, ... (top-1 %)
    transfer_protocols: dict[str, str] = field(default_factory=dict)
    protocol_knn: dict[str, float] = field(default_factory=dict)  # knn_dinov2_k10, ... (zoo.knn.KNN_PROTOCOLS)

    def to_json(self) -> dict[str, Any]:
        """The results.json form (what `parse_results` reads back)."""
        out: dict[str, Any] = {**self.metrics, **self.protocol_knn, **self.transfer}
        if self.transfer_protocols:
            out["transfer_protocols"] = dict(self.transfer_protocols)
        for key in ("protocol", "hardware", "train_minutes"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _number(value: Any, key: str, path: Path, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ExportError(f"{path}: {key} must be a number in [{low:g}, {high:g}], got {value!r}; fix the "
                          f"evaluation's results.json")
    return float(value)


def read_results(path: str | os.PathLike | None) -> Results:
    """Parse `results.json`; None or a missing file means nothing was measured."""
    if path is None:
        return Results()
    p = Path(path)
    if not p.exists():
        return Results()
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{p} is not valid JSON ({e}); rewrite it with the evaluation step") from e
    return parse_results(data, p)


def parse_results(data: Any, p: Path) -> Results:
    """`results.json`'s content (a dict) as Results; `p` names it in errors."""
    if not isinstance(data, dict):
        raise ExportError(f"{p} must hold a JSON object like {{\"knn_k20\": 85.3, \"protocol\": \"...\"}}")
    transfer = {k: _number(v, k, p, 0.0, 100.0) for k, v in data.items() if TRANSFER_KEY.match(k) and v is not None}
    protocols = data.get("transfer_protocols") or {}
    if not isinstance(protocols, dict) or not all(isinstance(v, str) for v in protocols.values()):
        raise ExportError(f"{p}: transfer_protocols must map keys to strings; rewrite it with zoo eval")
    from zoo.knn import knn_protocol_labels

    protocol_knn = {k: _number(v, k, p, 0.0, 100.0) for k, v in data.items()
                    if k in knn_protocol_labels() and v is not None}
    unknown = sorted(set(data) - set(METRICS) - set(_TEXT_FIELDS) - {"train_minutes", "transfer_protocols"}
                     - set(transfer) - set(protocol_knn))
    if unknown:
        log.warning("%s: ignoring unknown field(s) %s (known: %s, linear_<p>pct, finetune_<p>pct, "
                    "knn_<protocol>_k<k>)", p, ", ".join(unknown), ", ".join([*METRICS, *_TEXT_FIELDS, "train_minutes"]))
    metrics = {k: _number(data[k], k, p, 0.0, 100.0) for k in METRICS if data.get(k) is not None}
    minutes = data.get("train_minutes")
    texts = {}
    for key in _TEXT_FIELDS:
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ExportError(f"{p}: {key} must be a string, got {type(data[key]).__name__}")
        texts[key] = data.get(key)
    return Results(metrics=metrics, protocol=texts["protocol"], hardware=texts["hardware"], source=p,
                   train_minutes=None if minutes is None else _number(minutes, "train_minutes", p, 0.0, 1e7),
                   transfer=transfer, transfer_protocols={k: v for k, v in protocols.items() if k in transfer},
                   protocol_knn=protocol_knn)


EXPORTED_CONFIG = "config.json"
EXPORTED_WEIGHTS = "model.safetensors"
_PROTOCOL_LINE = re.compile(r"^Protocol: (.+)$", re.M)
_MONITOR_ROW = re.compile(r"^\| k-NN monitor at the end of training \| ([0-9.]+) %", re.M)


def is_exported_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / EXPORTED_CONFIG).is_file() and (p / EXPORTED_WEIGHTS).is_file() \
        and not (p / CHECKPOINT_FILE).exists()


def read_exported(folder: str | os.PathLike) -> tuple[TrainedCheckpoint, Results]:
    """A folder written by `zoo export` as an export source: re-card a shipped model whose training run is gone.

    The backbone comes from its safetensors, the recipe from the repository's recipe file, which must
    still hash to the config.json's `recipe_hash` (else the card would show a recipe the weights were not
    trained with); the measured results are config.json's (`extra.results`, or its metrics and minutes).
    """
    from training.recipe import load_recipe  # the one thing export needs of training: re-reading a recipe
    from zoo.safetensors_io import load_backbone

    p = Path(folder)
    try:
        config = json.loads((p / EXPORTED_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{p / EXPORTED_CONFIG} is not valid JSON ({e}); export from the training run instead") from e
    extra = config.get("extra") or {}
    recipe_path, recipe_hash = config.get("recipe"), extra.get("recipe_hash")
    try:
        recipe = load_recipe(recipe_path)
    except (OSError, ValueError, TypeError) as e:
        raise ExportError(f"{p}: its recipe {recipe_path!r} cannot be read ({e}); export from the training run's "
                          f"checkpoint.pt instead") from e
    if config_hash(recipe) != recipe_hash:
        raise ExportError(f"{p}: {recipe_path} has changed since this model was exported (sha256 "
                          f"{config_hash(recipe)[:12]}... vs {str(recipe_hash)[:12]}...); export from the training "
                          f"run's checkpoint.pt, which holds the recipe it was trained with")
    recipe = json.loads(json.dumps(recipe, sort_keys=True))  # key order as a checkpoint's recipe_json holds it
    state, _ = load_backbone(p / EXPORTED_WEIGHTS)
    card = (p / "README.md").read_text() if (p / "README.md").is_file() else ""
    monitor = extra.get("monitor_knn")
    if monitor is None:  # folders exported before monitor_knn was recorded: the card's row
        found = _MONITOR_ROW.search(card)
        monitor = float(found.group(1)) if found else None
    ckpt = TrainedCheckpoint(path=p / EXPORTED_WEIGHTS, backbone=state, recipe=recipe, recipe_hash=recipe_hash,
                             history=[] if monitor is None else [{"knn_top1": monitor}],
                             step=int(extra.get("steps", 0)), epoch=int(extra.get("epochs", 0)))
    measured = extra.get("results")
    if measured is None:  # folders exported before extra.results: config.json's numbers, the card's protocol line
        found = _PROTOCOL_LINE.search(card)
        measured = {**(config.get("metrics") or {}), "train_minutes": config.get("train_minutes"),
                    "protocol": found.group(1).strip() if found else None}
    return ckpt, parse_results({k: v for k, v in measured.items() if v is not None}, p / EXPORTED_CONFIG)


def combine_results(old: Results, new: Results) -> Results:
    """`old` with every field `new` measured replacing it (a re-card keeps what it does not re-measure)."""
    merged = {**old.to_json(), **new.to_json()}
    merged["transfer_protocols"] = {**old.transfer_protocols, **new.transfer_protocols}
    return parse_results(merged, new.source or old.source or Path("results.json"))
