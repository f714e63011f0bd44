"""`zoo report`: the results table of the shipped models beside their baselines, built from data.

The numbers come from `zoo/pretrained.json` (written by `zoo export` from the evaluation's results.json) and
from the baseline results under `zoo/baselines/` (written by `zoo eval ... --results`), so the README's table
is printed by code, never typed: `zoo report fmnist --markdown`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoo.registry import get_spec, list_models

BASELINES_DIR = Path(__file__).with_name("baselines")
COLUMNS = (("knn_k20", "k-NN k=20"), ("knn_k200", "k-NN k=200"), ("knn5_majority", "5-NN"), ("linear", "linear"))
# Baselines per dataset tag: (name in the table, results file under zoo/baselines/, the arch it is a baseline
# for (None: every arch), the command that measured it).
BASELINES = {
    "fmnist": (("raw pixels (standardised 784-d)", "fmnist-pixels.json", None, "zoo eval knn|linear pixels"),
               ("resnet18_narrow, random init", "fmnist-random-resnet18_narrow.json", "resnet18_narrow",
                "zoo eval knn|linear wmse-resnet18_narrow.fmnist --untrained"),
               ("resnet50, random init", "fmnist-random-resnet50.json", "resnet50",
                "zoo eval knn|linear wmse-resnet50.fmnist --untrained")),
}


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def rows(tag: str = "fmnist") -> list[dict[str, Any]]:
    """Shipped models of `tag` (best weighted k-NN k=20 first), then the baselines that have been measured."""
    out = []
    for name in list_models(f"*.{tag}", pretrained_only=True):
        spec = get_spec(name)
        out.append({"name": name, "method": spec.method, "arch": spec.arch, "train_minutes": spec.train_minutes,
                    **{key: spec.metrics.get(key) for key, _ in COLUMNS}})
    out.sort(key=lambda r: -(r["knn_k20"] if r["knn_k20"] is not None else -1.0))
    for label, measured in baselines(tag):
        out.append({"name": label, "method": "baseline", "arch": "", "train_minutes": None,
                    **{key: measured.get(key) for key, _ in COLUMNS}})
    return out


def baselines(tag: str, arch: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(name, measured metrics) of the baselines measured for `tag` (those of `arch` or of every arch)."""
    out = []
    for label, file, for_arch, _how in BASELINES.get(tag, ()):
        measured = _read(BASELINES_DIR / file)
        if measured and (for_arch is None or arch is None or for_arch == arch):
            out.append((label, measured))
    return out


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(tag: str = "fmnist", markdown: bool = True) -> str:
    """The table as Markdown (README, cards) or aligned text (terminal)."""
    header = ["model", "train min"] + [title for _, title in COLUMNS]
    body = [[r["name"], _fmt(r["train_minutes"], 1)] + [_fmt(r[key]) for key, _ in COLUMNS] for r in rows(tag)]
    if not body:
        return f"no shipped {tag} models and no measured baselines"
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in [header] + body)
