"""Read a folder `zoo export` wrote back as an export source (re-carding a shipped model whose run is gone).

Training runs' own files (`checkpoint.pt`, `results.json`) are read by `zoo.checkpoint`; what is left
here is export's: its error class and its own output folder.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from zoo.checkpoint import CHECKPOINT_FILE, Results, TrainedCheckpoint, parse_results
from zoo.errors import ZooError
from zoo.provenance import config_hash


class ExportError(ZooError, ValueError):
    """A checkpoint, results file or export request that cannot be exported as asked."""


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
