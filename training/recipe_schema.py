"""The keys a recipe may hold, per section: what `--set` accepts, so a typo is an error and not a silent new key.

Method keys are the method class's constructor parameters and each augmentation view's keys are
`PipelineConfig`'s fields, so those two lists cannot drift from the code that reads them. The other sections are
listed here: every key the trainer, data, optimiser and schedule code read (`grep 'cfg.get'`).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

# Keys read by training/trainer.py, data.py, optim.py and the schedule (lr_factor); the detection recipes'
# own keys are accepted because they are present in those recipes (see `known_keys`).
SECTION_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"arch", "zero_init_residual"}),
    "data": frozenset({"dataset", "root", "batch_size", "workers", "load_size", "size", "test_size", "test_split",
                       "train", "test"}),
    "augment": frozenset({"views", "params", "original"}),
    "optim": frozenset({"name", "lr", "weight_decay", "momentum", "nesterov", "betas", "eta", "exclude_bn_bias",
                        "scaling", "reference_batch", "batch_size", "clip_grad"}),
    "schedule": frozenset({"kind", "warmup_epochs", "warmup_steps", "warmup_start", "milestones",
                           "milestone_fractions", "gamma", "final_factor"}),
    "train": frozenset({"epochs", "max_steps", "seed", "precision", "channels_last", "compile", "checkpoint_every",
                        "log_every", "clip_grad"}),
    "eval": frozenset({"knn_every", "knn_bank", "knn_queries", "knn_k", "knn_t", "input_size", "resize_size"}),
}

# Detection transfer recipes (`task: detection`, training/detection.py) have sections of their own.
DETECTION_SECTION_KEYS: dict[str, frozenset[str]] = {
    "model": frozenset({"name", "arch", "weights", "detector", "fpn", "fpn_norm", "norm", "trainable_layers",
                        "min_size_train", "min_size_test", "max_size"}),
    "data": frozenset({"dataset", "root", "train", "test", "batch_size", "workers", "size", "test_size",
                       "image_size", "num_classes", "eval_limit"}),
    "optim": frozenset({"name", "lr", "momentum", "weight_decay", "reference_batch"}),
    "schedule": frozenset({"max_iter", "steps", "gamma", "warmup_iters", "warmup_factor"}),
    "train": frozenset({"seed", "precision", "checkpoint_every", "log_every", "eval", "ap"}),
}


def method_keys(method_name: str) -> frozenset[str]:
    """`name` plus the constructor parameters of the method class (after the backbone)."""
    from training.methods import get_method_class

    params = inspect.signature(get_method_class(method_name).__init__).parameters
    return frozenset({"name", *(p for p in params if p not in ("self", "backbone"))})


def view_keys() -> frozenset[str]:
    from training.augment import PipelineConfig

    return frozenset({"repeat", *(f.name for f in dataclasses.fields(PipelineConfig))})


def known_keys(recipe: dict[str, Any], section: str) -> frozenset[str]:
    """Keys `--set section.KEY` may name: those the recipe already has, plus the schema's for that section."""
    present = set(recipe.get(section) or {}) if isinstance(recipe.get(section), dict) else set()
    if section == "method" and isinstance(recipe.get("method"), dict) and "name" in recipe["method"]:
        try:
            return frozenset(present | method_keys(str(recipe["method"]["name"])))
        except Exception:  # an unknown method name is reported by the trainer, with the known names
            return frozenset(present)
    table = DETECTION_SECTION_KEYS if recipe.get("task") == "detection" else SECTION_KEYS
    return frozenset(present | table.get(section, frozenset()))


def check_override_key(recipe: dict[str, Any], parts: list[str], key: str) -> None:
    """Raise a one-line KeyError naming the closest known key when `--set key=...` names no key of the schema."""
    table = DETECTION_SECTION_KEYS if recipe.get("task") == "detection" else {**SECTION_KEYS, "method": None}
    sections = {s for s, body in recipe.items() if isinstance(body, dict)} | set(table)
    if parts[0] not in sections:
        close = difflib.get_close_matches(parts[0], sorted(sections), n=1)
        hint = f"did you mean {close[0]}?" if close else f"sections: {', '.join(sorted(sections))}"
        raise KeyError(f"--set {key}: {parts[0]!r} is not a section of the recipe; {hint}")
    if len(parts) == 2:
        known = known_keys(recipe, parts[0])
        if parts[1] not in known:
            close = difflib.get_close_matches(parts[1], sorted(known), n=1)
            hint = f"did you mean {parts[0]}.{close[0]}?" if close else f"known: {', '.join(sorted(known))}"
            raise KeyError(f"--set {key}: {parts[0]!r} has no key {parts[1]!r}; {hint}")
