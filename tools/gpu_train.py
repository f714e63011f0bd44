"""Train several recipes side by side on one lent GPU inside a time budget; bring back one small file per run.

    python3 tools/gpu_train.py --minutes 9 --out "$OUT" training/recipes/isd/fmnist.yaml training/recipes/groco/fmnist.yaml
    zoo eval knn isd-resnet18_narrow.fmnist --weights isd-fmnist.pt --results isd-fmnist.json   # back here
    zoo export isd-fmnist.pt --name isd-resnet18_narrow.fmnist --fp16 --results isd-fmnist.json

Why a tool of its own: a lent GPU comes for minutes, its machine is bare afterwards, and only a few files of
at most 16 MiB come back. Each recipe trains in its own process (one small net leaves most of the GPU idle);
at the deadline the runs still going get SIGTERM and keep their last checkpoint. For each run this writes
`OUT/<method>-<recipe>.pt`: the backbone, the recipe, the k-NN monitor history, the step, the summed minutes
and the hardware (what `zoo eval --weights` and `zoo export` read), without the optimiser state and the heads
that a full checkpoint carries. Such a file is for evaluating and exporting, not for `--resume`.
A table of step, epoch and last k-NN monitor per run is printed at the end.

On a lent machine with no Debian package, carry Fashion-MNIST (30 MB): here, `mkdir -p .fmnist && cp
/usr/share/datasets/fashion-mnist/*.gz .fmnist/` (`.fmnist/` is git-ignored), name `.fmnist` in the run's
carry, and start its command with `export FASHION_MNIST_DIR=.fmnist;`. Training needs no faiss.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from zoo.checkpoint import BACKBONE_PREFIX, CHECKPOINT_FILE, load_checkpoint, save_checkpoint  # noqa: E402

# What `zoo eval --weights` / `zoo export` read from a trainer checkpoint (zoo/checkpoint.py, zoo_cli/evaluate.py).
KEPT_FIELDS = ("recipe_json", "recipe_hash", "history", "step", "epoch", "train_seconds", "hardware")


def run_name(recipe: str) -> str:
    """`training/recipes/isd/fmnist.yaml` -> `isd-fmnist`."""
    p = Path(recipe)
    return f"{p.parent.name}-{p.stem}"


def slim_checkpoint(run_dir: Path, out_file: Path) -> dict[str, Any]:
    """The run's backbone and provenance as one small file (atomic write); returns its summary row."""
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE)
    slim = {k: ckpt[k] for k in KEPT_FIELDS if k in ckpt}
    slim["method"] = {k: v for k, v in ckpt["method"].items() if k.startswith(BACKBONE_PREFIX)}
    save_checkpoint(slim, out_file)
    history = json.loads(ckpt.get("history") or "[]")
    monitor = [h["knn_top1"] for h in history if isinstance(h, dict) and "knn_top1" in h]
    recipe = json.loads(ckpt["recipe_json"])
    return {"run": out_file.stem, "step": int(ckpt["step"]), "epoch": int(ckpt["epoch"]),
            "epochs": int(recipe["train"]["epochs"]), "knn": monitor[-1] if monitor else None,
            "minutes": float(ckpt.get("train_seconds", 0.0)) / 60, "mib": out_file.stat().st_size / 2**20}


def train_side_by_side(recipes: list[str], out: Path, minutes: float, overrides: list[str],
                       work: Path) -> list[dict[str, Any]]:
    """Start every recipe at once, stop what is still running at the deadline, slim every run into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = {}
    for recipe in recipes:
        cmd = [sys.executable, "-m", "training", recipe, "--out", str(work / run_name(recipe)), "--no-progress"]
        cmd += [arg for o in overrides for arg in ("--set", o)]
        log = open(work / f"{run_name(recipe)}.log", "w")  # noqa: SIM115 - closed with the process below
        procs[run_name(recipe)] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log)
    deadline = time.monotonic() + minutes * 60
    while any(p.poll() is None for p, _ in procs.values()) and time.monotonic() < deadline:
        time.sleep(2)
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the trainer leaves through its interrupt path
    rows = []
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        if not (work / name / CHECKPOINT_FILE).exists():
            tail = (work / f"{name}.log").read_text().strip().splitlines()[-1:] or ["no output"]
            rows.append({"run": name, "error": tail[0][:200]})
            continue
        rows.append(slim_checkpoint(work / name, out / f"{name}.pt"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="+", help="recipe YAML files; each runs in its own process")
    ap.add_argument("--out", required=True, help="folder for the <method>-<recipe>.pt files (e.g. $OUT)")
    ap.add_argument("--minutes", type=float, default=9.0, help="stop every run still going after this long")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override for every recipe, e.g. train.compile=reduce-overhead")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows = train_side_by_side(args.recipes, Path(args.out), args.minutes, args.set, Path(work))
    print("| run | step | epoch | last k-NN monitor | minutes | file MiB |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['run']} | **failed**: {r['error']} | | | | |")
        else:
            knn = f"{r['knn']:.2f}" if r["knn"] is not None else "-"
            print(f"| {r['run']} | {r['step']} | {r['epoch']}/{r['epochs']} | {knn} | {r['minutes']:.1f} | "
                  f"{r['mib']:.1f} |")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
