"""The model card's measured sections: label-efficient transfer, k-NN under other projects' protocols, and
the training history taken from the recipe file's header (each "" when there is nothing to show)."""

from __future__ import annotations

from typing import Any, Sequence

from zoo.checkpoint import Results, TrainedCheckpoint
from zoo.registry import ModelSpec

NOT_MEASURED = "not measured"


def fmt(value: float | None, unit: str = "") -> str:
    """A card number with two decimals, or "not measured"."""
    return NOT_MEASURED if value is None else f"{value:.2f}{unit}"


def transfer_description(key: str) -> str:
    """`linear_10pct` -> "linear probe, 10% of the labels (class-balanced)"; `finetune_100pct` -> "fine-tuning, all labels"."""
    kind, pct = key.rsplit("_", 1)
    share = pct[:-3].replace("p", ".")
    what = "all labels" if float(share) == 100 else f"{share}% of the labels (class-balanced)"
    return f"{'linear probe' if kind == 'linear' else 'fine-tuning'}, {what}"


def _transfer_order(key: str) -> tuple[int, float]:
    kind, pct = key.rsplit("_", 1)
    return (0 if kind == "linear" else 1, float(pct[:-3].replace("p", ".")))


def transfer_section(results: Results, base: Sequence[tuple[str, dict[str, Any]]] = ()) -> str:
    """The card's label-efficient transfer table (each number with its protocol, beside the baselines that
    measured the same key, e.g. the raw-pixel linear probe), or "" when none was measured."""
    if not results.transfer:
        return ""
    base = [(label, m) for label, m in base if any(k in m for k in results.transfer)]
    header = "| protocol | top-1 (%) |" + "".join(f" {label} |" for label, _ in base) + " how it was measured |"
    header += "\n|---|---:|" + "---:|" * len(base) + "---|"
    rows = "\n".join(f"| {transfer_description(k)} | {results.transfer[k]:.2f} |"
                     + "".join(f" {fmt(m.get(k))} |" for _, m in base)
                     + f" {results.transfer_protocols.get(k, 'protocol not recorded')} |"
                     for k in sorted(results.transfer, key=_transfer_order))
    return f"""
### Label-efficient transfer

Top-1 accuracy (%) with part of the labels (`zoo eval linear --labels`, `zoo eval finetune`; subsets hold the same
number of images per class, drawn with a fixed seed):

{header}
{rows}
"""


def protocol_knn_section(results: Results) -> str:
    """The card's table of k-NN numbers under other projects' protocols, each row naming its protocol and the
    code it reproduces, or "" when none was measured."""
    if not results.protocol_knn:
        return ""
    from zoo.knn import KNN_PROTOCOLS

    by_key = {p.key(k): (p, k) for p in KNN_PROTOCOLS.values() for k in p.ks}
    order = {key: i for i, key in enumerate(by_key)}
    rows = "\n".join(f"| `{key}` | {by_key[key][0].describe(by_key[key][1])} | {results.protocol_knn[key]:.2f} | "
                     f"{by_key[key][0].source} |" for key in sorted(results.protocol_knn, key=order.__getitem__))
    return f"""
### k-NN under other projects' protocols

The same features and splits, scored the way other SSL code bases score k-NN (`zoo eval knn --protocol NAME`), so
numbers can be compared with theirs:

| key | protocol | top-1 (%) | evaluation code it reproduces |
|---|---|---|---|
{rows}
"""


def recipe_header(path: str | None) -> str:
    """The `#` comment lines at the top of a recipe file, without their `# ` prefix ("" if none or unreadable)."""
    from training.recipe import resolve_recipe_path

    if not path:
        return ""
    try:
        text = resolve_recipe_path(path).read_text()
    except (OSError, ValueError):
        return ""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(lines).strip("\n")


def history_section(spec: ModelSpec, checkpoint: TrainedCheckpoint) -> str:
    """The card's "Training history (from the recipe)": the recipe file's header comment, or "" when the file
    is missing, has no header, or no longer resolves to the recipe these weights were trained with (its header
    would then describe other runs)."""
    from training.recipe import config_hash, load_recipe

    header = recipe_header(spec.recipe)
    if not header:
        return ""
    try:
        same = config_hash(load_recipe(spec.recipe)) == checkpoint.recipe_hash
    except (OSError, ValueError, TypeError, KeyError):
        same = False
    if not same:
        return ""
    fence = "````" if "```" in header else "```"
    return f"""
## Training history (from the recipe)

The header comment of `{spec.recipe}`, as committed with the recipe: the measured record
of the runs made with it (the trainer's k-NN monitor per epoch, probes, wall-clock minutes, same-seed reruns).

{fence}text
{header}
{fence}
"""
