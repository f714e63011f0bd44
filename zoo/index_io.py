"""Files of `zoo.Index`: the index folder (written atomically) and the shard folders it is built from.

An index folder holds `index.faiss` (a CPU index), `ids.npy` (int ids) or `ids.json`, `labels.json`
when the vectors carry labels, and `meta.json` (format, dim, metric, factory, search parameters,
model). It is written into a temporary sibling folder and swapped in: a crash leaves the old index or
the new one, never a mix. A shard folder is what `zoo.shards.embed_to_dir` writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import IndexUsageError, require
from zoo.shards import iter_shards

FORMAT = "ssl-zoo-index/1"


def faiss_module() -> Any:
    """faiss, or a MissingDependencyError naming the pip extra."""
    return require("faiss", "gpu", "zoo.Index")


def write_index_folder(directory: str | os.PathLike, cpu_index: Any, ids: list[Any], id_table: np.ndarray,
                       labels: list[Any] | None, meta: dict[str, Any]) -> Path:
    """Write an index folder atomically; `cpu_index` None for an index nothing was added to yet."""
    faiss = faiss_module()
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if cpu_index is not None:
            faiss.write_index(cpu_index, str(tmp / "index.faiss"))
        if id_table.dtype == np.int64:
            np.save(tmp / "ids.npy", id_table)
        else:
            (tmp / "ids.json").write_text(json.dumps(ids))
        if labels is not None:
            (tmp / "labels.json").write_text(json.dumps(labels))
        meta = {"format": FORMAT, **meta, "faiss_version": getattr(faiss, "__version__", None)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            old.rmdir()
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_index_folder(directory: str | os.PathLike
                      ) -> tuple[Path, dict[str, Any], Any, list[Any], list[Any] | None]:
    """(folder, meta, CPU faiss index or None, ids, labels or None) of an index folder."""
    faiss = faiss_module()
    directory = Path(directory)
    if not (directory / "meta.json").exists() and (directory / "index" / "meta.json").exists():
        directory = directory / "index"  # the folder `zoo index build --out` writes
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise IndexUsageError(f"{directory} is not an ssl-zoo index folder (no meta.json); build one with "
                              f"`zoo index build` or Index.save")
    meta = json.loads(meta_path.read_text())
    index = None
    if (directory / "index.faiss").exists():
        index = faiss.read_index(str(directory / "index.faiss"))
    ids: list[Any] = []
    if (directory / "ids.npy").exists():
        ids = np.load(directory / "ids.npy").tolist()
    elif (directory / "ids.json").exists():
        ids = json.loads((directory / "ids.json").read_text())
    labels = None
    if (directory / "labels.json").exists():
        labels = json.loads((directory / "labels.json").read_text())
    return directory, meta, index, ids, labels


def read_shard_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(index.json, the model recorded in config.json) of a complete `embed_to_dir` folder with vectors."""
    directory = Path(directory)
    info_path = directory / "index.json"
    if not info_path.exists():
        raise IndexUsageError(f"{directory} has no index.json; embed into it with `zoo embed ... --out {directory}`")
    info = json.loads(info_path.read_text())
    if not info.get("complete"):
        raise IndexUsageError(f"{directory} is unfinished ({info['finished']} of {info['n_shards']} shards); run "
                              f"the same `zoo embed` again to finish it")
    if not info["embedded"] or not info.get("dim"):
        raise IndexUsageError(f"{directory} holds no embedded vectors ({info.get('failed', 0)} inputs failed)")
    cfg = directory / "config.json"
    model = json.loads(cfg.read_text()).get("model_info") if cfg.exists() else None
    return info, model or info.get("model")


def sample_shard_rows(directory: str | os.PathLike, total: int, n: int) -> np.ndarray:
    """`n` random rows (fixed seed) of a shard folder's `total`, gathered from the memory-mapped shards."""
    rows = np.sort(np.random.default_rng(0).choice(total, size=n, replace=False))
    parts, offset = [], 0
    for feats, _, _ in iter_shards(directory):
        sel = rows[(rows >= offset) & (rows < offset + len(feats))] - offset
        if len(sel):
            parts.append(np.asarray(feats[sel]))
        offset += len(feats)
    return np.concatenate(parts)
