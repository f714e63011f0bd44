"""Files of `zoo.Index`: the index folder (written atomically) and the shard folders it is built from.

An index folder holds `index.faiss` (a CPU index), `ids.npy` (int ids) or `ids.json`, `labels.json`
when the vectors carry labels, and `meta.json` (format, dim, metric, factory, search parameters,
model). Saving never removes a file that is not one of these; loading checks that they agree
(dimension, metric, count) and names the damaged file. A shard folder is what
`zoo.shards.embed_to_dir` writes.
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
from zoo.fsutil import normal_mode
from zoo.shards import iter_shards

FORMAT = "ssl-zoo-index/1"


def faiss_module() -> Any:
    """faiss, or a MissingDependencyError naming the pip extra."""
    return require("faiss", "gpu", "zoo.Index")


OWN_FILES = ("index.faiss", "ids.npy", "ids.json", "labels.json", "meta.json")  # meta.json: written last


def _is_index_folder(directory: Path) -> bool:
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_save_target(directory: str | os.PathLike, overwrite: bool = False) -> list[str]:
    """The entries of `directory` that are not the index's own files; refuses a file or a foreign folder."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise IndexUsageError(f"{directory} is a file; Index.save writes a folder: pass a new folder path")
    if not directory.exists():
        return []
    entries = sorted(p.name for p in directory.iterdir())
    foreign = [e for e in entries if e not in OWN_FILES]
    if entries and not overwrite and not _is_index_folder(directory):
        shown = ", ".join(foreign[:3] or entries[:3]) + (", ..." if len(foreign or entries) > 3 else "")
        raise IndexUsageError(f"{directory} is not empty and is not an ssl-zoo index folder (it holds {shown}); "
                              f"save to a new or empty folder, or pass overwrite=True (other files are kept)")
    return foreign


def write_index_folder(directory: str | os.PathLike, cpu_index: Any, ids: list[Any], id_table: np.ndarray,
                       labels: list[Any] | None, meta: dict[str, Any], overwrite: bool = False) -> Path:
    """Write an index folder; `cpu_index` None for an index nothing was added to yet.

    Into a new or empty folder, or over an index folder: the files are written into a temporary
    sibling folder that is swapped in whole (a crash leaves the old index or the new one). Where the
    folder also holds other files (kept, never removed), the index's own files are renamed in one by
    one instead, `meta.json` removed first and written last, so an interrupted save is not an index.
    """
    faiss = faiss_module()
    directory = Path(directory)
    foreign = check_save_target(directory, overwrite)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        tmp.chmod(normal_mode(folder=True))  # mkdtemp's 0700 would hide the published index from others
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
        if foreign:
            _replace_own_files(tmp, directory)
        else:
            old = None
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
                old.rmdir()
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # only the index's own files: foreign was empty
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _replace_own_files(tmp: Path, directory: Path) -> None:
    (directory / "meta.json").unlink(missing_ok=True)  # until the new one lands, this is not an index
    for name in OWN_FILES:
        if (tmp / name).exists():
            if name != "meta.json":
                os.replace(tmp / name, directory / name)
        elif name != "meta.json":
            (directory / name).unlink(missing_ok=True)  # e.g. labels.json of the previous index
    os.replace(tmp / "meta.json", directory / "meta.json")


def _damaged(path: Path, what: str) -> IndexUsageError:
    return IndexUsageError(f"{path} is damaged ({what}); rebuild it (`zoo embed` / `zoo index build`, Index.save)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise _damaged(path, f"not valid JSON: {str(e).splitlines()[0]}") from None


def read_index_folder(directory: str | os.PathLike
                      ) -> tuple[Path, dict[str, Any], Any, list[Any], list[Any] | None]:
    """(folder, meta, CPU faiss index or None, ids, labels or None) of an index folder, checked to agree."""
    faiss = faiss_module()
    directory = Path(directory)
    if not (directory / "meta.json").exists() and (directory / "index" / "meta.json").exists():
        directory = directory / "index"  # the folder `zoo index build --out` writes
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise IndexUsageError(f"{directory} is not an ssl-zoo index folder (no meta.json); build one with "
                              f"`zoo index build` or Index.save")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or any(k not in meta for k in ("dim", "metric", "kind")):
        raise _damaged(meta_path, "it lacks dim, metric or kind")
    index = None
    faiss_path = directory / "index.faiss"
    if faiss_path.exists():
        try:
            index = faiss.read_index(str(faiss_path))
        except RuntimeError:  # FAISS's message is a multi-line C++ trace
            raise _damaged(faiss_path, "truncated or not a FAISS index") from None
    elif meta.get("ntotal"):
        raise _damaged(faiss_path, f"missing, but {meta_path.name} records {meta['ntotal']} vectors")
    ids: list[Any] = []
    if (directory / "ids.npy").exists():
        try:
            ids = np.load(directory / "ids.npy").tolist()
        except (ValueError, OSError, EOFError) as e:
            raise _damaged(directory / "ids.npy", f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    elif (directory / "ids.json").exists():
        ids = _read_json(directory / "ids.json")
    labels = _read_json(directory / "labels.json") if (directory / "labels.json").exists() else None
    if index is not None:
        _check_agrees(directory, meta, index, ids, labels)
    return directory, meta, index, ids, labels


def _check_agrees(directory: Path, meta: dict[str, Any], index: Any, ids: list[Any], labels: list[Any] | None
                  ) -> None:
    """meta.json against index.faiss: an edited or mixed folder would return wrong scores silently."""
    faiss = faiss_module()
    meta_path, faiss_path = directory / "meta.json", directory / "index.faiss"
    expected = {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}.get(meta["metric"])
    if expected is None:
        raise _damaged(meta_path, f"metric {meta['metric']!r} is neither 'cosine' nor 'l2'")
    if index.metric_type != expected:
        held = "inner product (cosine)" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "L2"
        raise _damaged(meta_path, f"metric {meta['metric']!r} but {faiss_path.name} scores by {held}")
    if meta["dim"] != index.d:
        raise _damaged(meta_path, f"dim {meta['dim']} but {faiss_path.name} holds {index.d}-d vectors")
    if meta.get("ntotal") is not None and meta["ntotal"] != index.ntotal:
        raise _damaged(meta_path, f"ntotal {meta['ntotal']} but {faiss_path.name} holds {index.ntotal} vectors")
    ids_name = "ids.npy" if (directory / "ids.npy").exists() else "ids.json"
    if not isinstance(ids, list) or len(ids) != index.ntotal:
        raise _damaged(directory / ids_name, f"{len(ids) if isinstance(ids, list) else 'no'} ids for "
                                             f"{index.ntotal} vectors")
    if labels is not None and (not isinstance(labels, list) or len(labels) != index.ntotal):
        raise _damaged(directory / "labels.json", f"labels do not match the {index.ntotal} vectors")


def read_shard_folder(directory: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(index.json, the model recorded in config.json) of a complete `embed_to_dir` folder with vectors."""
    directory = Path(directory)
    info_path = directory / "index.json"
    if not info_path.exists():
        raise IndexUsageError(f"{directory} has no index.json; embed into it with `zoo embed ... --out {directory}`")
    info = _read_json(info_path)
    if not isinstance(info, dict) or "embedded" not in info:
        raise _damaged(info_path, "not an embedding folder's index")
    if not info.get("complete"):
        raise IndexUsageError(f"{directory} is unfinished ({info['finished']} of {info['n_shards']} shards); run "
                              f"the same `zoo embed` again to finish it")
    if not info["embedded"] or not info.get("dim"):
        raise IndexUsageError(f"{directory} holds no embedded vectors ({info.get('failed', 0)} inputs failed)")
    cfg = directory / "config.json"
    config = _read_json(cfg) if cfg.exists() else {}
    model = config.get("model_info") if isinstance(config, dict) else None
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
