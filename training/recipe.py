"""Recipes: YAML files under training/recipes/<method>/<dataset>.yaml, with `--set key=value` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from training.recipe_schema import check_override_key
# A recipe's hash is defined in the library (zoo convert and export need it too); imported for `training.recipe` users.
from zoo.provenance import config_hash  # noqa: F401

RECIPES_DIR = Path(__file__).with_name("recipes")
REQUIRED = ("method", "model", "data", "augment", "optim", "train")


def resolve_recipe_path(path: str | os.PathLike) -> Path:
    """A path as given, or relative to the repository / package (`training/recipes/wmse/fmnist.yaml`)."""
    p = Path(path)
    for candidate in (p, RECIPES_DIR.parent.parent / p, RECIPES_DIR / p):
        if candidate.is_file():
            return candidate
    known = sorted(str(q.relative_to(RECIPES_DIR.parent.parent)) for q in RECIPES_DIR.rglob("*.yaml"))
    import difflib

    close = difflib.get_close_matches(str(path), known, n=3)
    raise FileNotFoundError(f"recipe {path} not found; did you mean {', '.join(close) or known[:3]}?")


def apply_overrides(recipe: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """`train.epochs=1` style overrides; values parsed as YAML (numbers, lists, booleans)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key=value (e.g. train.epochs=1), got {item!r}")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in ("epochs", "max_steps", "seed", "precision"):
            parts = ["train", parts[0]]  # shorthands for the most common overrides
        check_override_key(recipe, parts, key)
        node = recipe
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise KeyError(f"--set {key}: {part!r} is not a section of the recipe")
            node = node[part]
        node[parts[-1]] = yaml.safe_load(value)
    return recipe


def read_yaml(path: Path) -> Any:
    """Parse a YAML file; a syntax error is one line naming the file and line to fix."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{where}: not valid YAML ({problem}); fix that line") from None


def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> dict[str, Any]:
    resolved = resolve_recipe_path(path)
    recipe = read_yaml(resolved)
    if not isinstance(recipe, dict):
        raise ValueError(f"{resolved}: a recipe is a YAML mapping with sections {', '.join(REQUIRED)}")
    missing = [k for k in REQUIRED if k not in recipe]
    if missing:
        raise ValueError(f"recipe {path} lacks section(s) {', '.join(missing)}")
    return _resolve_milestone_fractions(apply_overrides(recipe, overrides), path)


def _resolve_milestone_fractions(recipe: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """`schedule.milestone_fractions: [0.95, 0.975]` -> `milestones` in epochs of this recipe's `train.epochs`.

    Resolved here, after the overrides, so `--set train.epochs=N` moves the drops with the run's length and the
    resolved recipe (what the trainer runs, hashes and writes on the card) states the drops in epochs.
    """
    schedule = recipe.get("schedule") or {}
    fractions = schedule.pop("milestone_fractions", None)
    if fractions is None:
        return recipe
    if "milestones" in schedule:
        raise ValueError(f"recipe {path}: schedule gives both milestones and milestone_fractions; keep one")
    if not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions):
        raise ValueError(f"recipe {path}: milestone_fractions must lie in (0, 1) (fractions of train.epochs), "
                         f"got {fractions}")
    # round() so that 0.95 of 7 epochs resolves to 6.65, the value a hand-written `milestones: [6.65]` parses to.
    schedule["milestones"] = [round(float(f) * float(recipe["train"]["epochs"]), 6) for f in fractions]
    return recipe


def dump_recipe(recipe: dict[str, Any], path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
