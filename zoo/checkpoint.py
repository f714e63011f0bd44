"""What a run folder holds: `checkpoint.pt` (training) and `results.json` (evaluation), written and read here only.

Every `checkpoint.pt` is written with `save_checkpoint` (torch.save into memory, then an atomic rename,
so a kill mid-write never leaves a broken file) and read with `load_checkpoint` (`torch.load(weights_only
=True)`: nothing beyond tensors and plain types is unpickled; a damaged or zero-byte file is a one-line
`CheckpointError` naming it). Three kinds are written:

- the trainer's (`training.trainer`): `method` (the method's state dict; backbone keys start with
  `backbone.`), `optimizer`, `scaler`, `torch_rng`, `recipe_json` / `recipe_hash` (the resolved recipe and
  its sha256), `history` (a JSON list of per-epoch records, `knn_top1` from the k-NN monitor), `step`,
  `epoch`, `batch_in_epoch`, `skipped_files`, `train_seconds`;
- a converted one (`zoo.convert` with a name, `backbone_checkpoint`): `method` (backbone keys only),
  `recipe_json`, `recipe_hash`, `history` ("[]"), `step`, `epoch` (0): what `read_checkpoint` needs;
- the detection trainer's (`training.detection`): `model` (the detector's state dict), `optimizer`, `iter`.

`read_checkpoint` views the first two as a `TrainedCheckpoint` (what `zoo export` and `--weights RUN` use).

`results.json` (beside the checkpoint by default) holds the measured numbers the model card and
registry report; `update_results` is its one writer (`zoo eval`, zoo/transfer.py), `read_results` its
reader. Every field is optional; a metric that is absent is "not measured", never guessed:

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

import io
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
from zoo.fsutil import atomic_write_bytes, atomic_write_text
from zoo.provenance import config_hash

log = logging.getLogger("zoo")

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
_TEXT_FIELDS = ("protocol", "hardware", "measured_on")
TRANSFER_KEY = re.compile(r"^(linear|finetune)_(\d+(?:p\d+)?)pct$")  # written by zoo/transfer.py


class CheckpointError(ZooError, ValueError):
    """A checkpoint.pt or results.json that cannot be read (or merged into) as asked."""


# ------------------------------------------------------------------------------------------ checkpoint.pt
def save_checkpoint(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """torch.save through memory and an atomic rename: a kill mid-write never leaves a broken checkpoint."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    hint: str = "it may be from another version or damaged: start a fresh run with --out"
                    ) -> dict[str, Any]:
    """A checkpoint's dict (weights_only); any failure is one CheckpointError line naming the file and `hint`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle errors of many kinds, a truncated zip, a zero-byte file (IndexError, no text)
        reason = (str(e).splitlines() or ["empty or unreadable file"])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {reason}); {hint}") from None


def backbone_checkpoint(backbone: dict[str, torch.Tensor], recipe: dict[str, Any]) -> dict[str, Any]:
    """The smallest checkpoint `read_checkpoint` accepts: a backbone and the recipe it stands for."""
    return {"method": {f"{BACKBONE_PREFIX}{k}": v for k, v in backbone.items()},
            "recipe_json": json.dumps(recipe, sort_keys=True), "recipe_hash": config_hash(recipe),
            "history": "[]", "step": 0, "epoch": 0}


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
        raise CheckpointError(f"no checkpoint at {path}; pass a run folder written by `zoo train` or its "
                              f"{CHECKPOINT_FILE}")
    return p


def read_checkpoint(path: str | os.PathLike) -> TrainedCheckpoint:
    """The backbone state dict (prefix `backbone.` removed), recipe, hash and history of a trainer checkpoint."""
    p = checkpoint_path(path)
    ckpt = load_checkpoint(p, hint=f"pass the {CHECKPOINT_FILE} of a `zoo train` run")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("method"), dict):
        raise CheckpointError(f"{p} is not a `zoo train` checkpoint (no 'method' state dict); pass the "
                              f"{CHECKPOINT_FILE} of a training run, or load plain weights with "
                              f"zoo.load(name, pretrained=PATH)")
    backbone = {k[len(BACKBONE_PREFIX):]: v for k, v in ckpt["method"].items() if k.startswith(BACKBONE_PREFIX)}
    if not backbone:
        raise CheckpointError(f"{p} has no '{BACKBONE_PREFIX}*' keys in its method state; it was not written by "
                              f"ssl-zoo's trainer (expected method.backbone.conv1.weight, ...)")
    try:
        recipe = json.loads(ckpt.get("recipe_json") or "null")
        history = json.loads(ckpt.get("history") or "[]")
    except (TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} holds a malformed recipe_json or history ({e}); re-save it with "
                              f"`zoo train --resume`") from e
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{p} has no recipe (recipe_json); export needs the run's recipe: re-save the "
                              f"checkpoint with the current `zoo train`")
    recipe_hash = str(ckpt.get("recipe_hash") or config_hash(recipe))
    if recipe_hash != config_hash(recipe):
        log.warning("%s: recipe_hash %s... does not match its recipe_json (%s...); the recipe's own hash is used",
                    p, recipe_hash[:12], config_hash(recipe)[:12])
        recipe_hash = config_hash(recipe)
    return TrainedCheckpoint(path=p, backbone=backbone, recipe=recipe, recipe_hash=recipe_hash,
                             history=history if isinstance(history, list) else [],
                             step=int(ckpt.get("step", 0)), epoch=int(ckpt.get("epoch", 0)))


# ------------------------------------------------------------------------------------------ results.json
@dataclass
class Results:
    """Measured evaluation numbers; a missing metric is not measured."""

    metrics: dict[str, float] = field(default_factory=dict)
    protocol: str | None = None
    train_minutes: float | None = None
    hardware: str | None = None
    measured_on: str | None = None  # which weights the numbers come from (the card must say)
    source: Path | None = None
    transfer: dict[str, float] = field(default_factory=dict)  # linear_10pct, finetune_1pct, ... (top-1 %)
    transfer_protocols: dict[str, str] = field(default_factory=dict)
    protocol_knn: dict[str, float] = field(default_factory=dict)  # knn_dinov2_k10, ... (zoo.knn.KNN_PROTOCOLS)

    def to_json(self) -> dict[str, Any]:
        """The results.json form (what `parse_results` reads back)."""
        out: dict[str, Any] = {**self.metrics, **self.protocol_knn, **self.transfer}
        if self.transfer_protocols:
            out["transfer_protocols"] = dict(self.transfer_protocols)
        for key in ("protocol", "hardware", "measured_on", "train_minutes"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _number(value: Any, key: str, path: Path, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise CheckpointError(f"{path}: {key} must be a number in [{low:g}, {high:g}], got {value!r}; fix the "
                              f"evaluation's {RESULTS_FILE}")
    return float(value)


def _read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON ({e}); rewrite it with the evaluation step") from e


def read_results(path: str | os.PathLike | None) -> Results:
    """Parse `results.json`; None or a missing file means nothing was measured."""
    if path is None or not Path(path).exists():
        return Results()
    return parse_results(_read_json(Path(path)), Path(path))


def parse_results(data: Any, p: Path) -> Results:
    """`results.json`'s content (a dict) as Results; `p` names it in errors."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{p} must hold a JSON object like {{\"knn_k20\": 85.3, \"protocol\": \"...\"}}")
    transfer = {k: _number(v, k, p, 0.0, 100.0) for k, v in data.items() if TRANSFER_KEY.match(k) and v is not None}
    protocols = data.get("transfer_protocols") or {}
    if not isinstance(protocols, dict) or not all(isinstance(v, str) for v in protocols.values()):
        raise CheckpointError(f"{p}: transfer_protocols must map keys to strings; rewrite it with zoo eval")
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
            raise CheckpointError(f"{p}: {key} must be a string, got {type(data[key]).__name__}")
        texts[key] = data.get(key)
    return Results(metrics=metrics, protocol=texts["protocol"], hardware=texts["hardware"],
                   measured_on=texts["measured_on"], source=p,
                   train_minutes=None if minutes is None else _number(minutes, "train_minutes", p, 0.0, 1e7),
                   transfer=transfer, transfer_protocols={k: v for k, v in protocols.items() if k in transfer},
                   protocol_knn=protocol_knn)


def combine_results(old: Results, new: Results) -> Results:
    """`old` with every field `new` measured replacing it (a re-card keeps what it does not re-measure)."""
    merged = {**old.to_json(), **new.to_json()}
    merged["transfer_protocols"] = {**old.transfer_protocols, **new.transfer_protocols}
    return parse_results(merged, new.source or old.source or Path(RESULTS_FILE))


def update_results(path: str | os.PathLike, values: dict[str, Any],
                   transfer_protocols: dict[str, str] | None = None) -> Path:
    """Merge `values` (numbers rounded to 2 decimals) and `transfer_protocols` into a results.json, atomically.

    Every key already there and not in `values` is kept: k-NN, linear and transfer numbers are measured
    by separate commands into the same file.
    """
    path = Path(path)
    data = _read_json(path) if path.exists() else {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; it is read by zoo export")
    if values.get("measured_on") and data.get("measured_on") and values["measured_on"] != data["measured_on"]:
        # Numbers of two sets of weights in one file: the card must name both, not the last one alone.
        if values["measured_on"] not in data["measured_on"]:
            values = {**values, "measured_on": f"{data['measured_on']}; then {values['measured_on']}"}
        else:
            values = {**values, "measured_on": data["measured_on"]}
    data.update({k: round(float(v), 2) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                 for k, v in values.items()})
    if transfer_protocols is not None:
        data["transfer_protocols"] = {**(data.get("transfer_protocols") or {}), **transfer_protocols}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
