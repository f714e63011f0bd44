"""`embed_to_dir`: a corpus embedded into a folder of shards that survives a kill, split over `torchrun` ranks.

    embed_to_dir(model, "photos/", "out/")      # out/features.npy + out/ids.json when it is done
    read_embeddings("out/")                     # the same Embeddings `zoo.embed` returns

Shards are written as they finish (features first, then the marker), so a run started again with the
same arguments resumes at the first unfinished shard; `iter_shards` streams a folder shard by shard
(memory-mapped), `merge_shards` concatenates them. Batching and runners are `zoo.embed`'s.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from zoo import distributed as zoo_dist
from zoo.artifacts import weights_fingerprint
from zoo.embed import Embeddings, checked_runner, default_workers, prepare, run_batches, runner_device
from zoo.errors import EmbedError
from zoo.fsutil import atomic_save_npy, atomic_write_json
from zoo.images import DEFAULT_MAX_PIXELS
from zoo.runners import model_device
from zoo.sources import Source

log = logging.getLogger("zoo")


def _jsonable(x: Any) -> Any:
    return int(x) if isinstance(x, (np.integer,)) else x


def shard_name(s: int) -> str:
    """`shard-NNNNN`: the stem of shard `s`'s `.npy` features and `.json` marker under `shards/`."""
    return f"shard-{s:05d}"


def _finished_shards(out: Path, n_shards: int) -> dict[int, dict]:
    """Shards whose marker (written last, atomically) exists: those are complete on disk."""
    done = {}
    for s in range(n_shards):
        meta = out / "shards" / f"{shard_name(s)}.json"
        if meta.exists():
            try:
                m = json.loads(meta.read_text())
                rows = np.load(meta.with_suffix(".npy"), mmap_mode="r").shape[0]
            except (OSError, ValueError, EOFError):
                continue  # a marker is written atomically; unreadable means foreign: redo the shard
            if isinstance(m, dict) and rows == m.get("count") == len(m.get("ids", ())):
                done[s] = m  # else features and marker disagree (a damaged file): redo the shard
    return done


# Everything that changes the numbers: a folder resumes only when all of these are the same.
RESUME_KEYS = ("model", "weights", "inputs", "total", "shard_size", "backend", "precision", "normalize", "layer",
               "pool", "preprocess")


def _preprocess_key(pre: Any) -> Any:
    """The preprocessing as JSON: `zoo.preprocess.Preprocess`'s fields, else the callable's name."""
    fields = ("input_size", "resize_size", "mean", "std", "interpolation")
    if all(hasattr(pre, f) for f in fields):
        return {f: list(getattr(pre, f)) if isinstance(getattr(pre, f), tuple) else getattr(pre, f) for f in fields}
    return getattr(pre, "__qualname__", type(pre).__qualname__)


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def refuse_other_run(out: Path, old: Any, config: dict) -> None:
    """One-line EmbedError naming what differs between `out/config.json` and this run (weights, inputs...)."""
    if not isinstance(old, dict):
        raise EmbedError(f"{out / 'config.json'} is not an embedding config (not a JSON object); pass a new --out "
                         f"folder")
    new = json.loads(json.dumps(config, default=str))  # tuples as lists: compared as config.json holds them
    diff = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if diff:
        what = "; ".join(f"{k}: {_short(old.get(k))} there, {_short(new.get(k))} now" for k in diff)
        raise EmbedError(f"{out} holds a different embedding run ({what}); pass a new --out folder, or delete {out} "
                         f"to start over")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EmbedError(f"{path} is damaged (not valid JSON: {str(e).splitlines()[0]}); pass a new --out folder, "
                         f"or delete {path.parent} to start over") from None


def _write_index(out: Path, config: dict, n_shards: int, complete: bool) -> dict:
    done = _finished_shards(out, n_shards)
    shards = [{"name": shard_name(s), "start": m["start"], "stop": m["stop"], "count": m["count"],
               "failed": len(m["failed"])} for s, m in sorted(done.items())]
    index = {"model": config.get("model"), "dim": next((m["dim"] for m in done.values() if m.get("dim")), None),
             "total_inputs": config["total"], "n_shards": n_shards, "finished": len(shards),
             "embedded": sum(s["count"] for s in shards), "failed": sum(s["failed"] for s in shards),
             "complete": complete, "merged": False, "shards": shards}
    atomic_write_json(out / "index.json", index)
    return index


def embed_to_dir(model: torch.nn.Module, inputs: Any, out: str | os.PathLike, shard_size: int = 10000,
                 batch_size: int | None = None, device: str | torch.device | None = None, backend: str = "torch",
                 precision: str = "fp32", normalize: bool = True, progress: bool = True,
                 num_workers: int | None = None, merge: bool = True, model_info: dict | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, layer: str | None = None, pool: str = "avg") -> dict:
    """Embed a corpus into `out/` in shards; resumable, and split over ranks under `torchrun`.

    Layout: `config.json` (what is embedded: model, weights fingerprint, inputs, backend, precision,
    preprocessing, normalisation, layer / pool; a folder resumes only when all agree, `RESUME_KEYS`,
    and a mismatch is refused without touching it), `shards/shard-NNNNN.npy`
    (float32 features) + `shard-NNNNN.json` (ids, failed inputs, labels; written last, so its presence
    means the shard is finished), `index.json` (the finished shards, `complete` at the end), and with
    `merge`, `features.npy` + `ids.json` concatenated in input order (written streaming, shard by shard).
    A killed run started again with the same arguments skips every finished shard. Under torchrun each
    rank embeds shards `rank, rank + world, ...` (gloo on CPU, nccl on CUDA; rank 0's weights are
    broadcast so untrained models agree) and rank 0 writes the index and the merge. Returns index.json.
    `layer` / `pool` as in `embed`; a non-default pair is recorded in config.json (with `map_shape` for
    `pool="none"`), and a folder only resumes the same pair.
    """
    import torch.distributed as dist

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EmbedError(f"--out {out} is a file; embeddings are written into a folder: pass a new folder path")
    base_model = model
    model, source, bs = prepare(model, inputs, layer, pool, backend, precision, None, max_pixels, batch_size)
    shard_size = int(shard_size)
    if shard_size < 1 or bs < 1:
        raise EmbedError(f"shard_size and batch_size must be >= 1, got {shard_size} and {bs}")
    we_init = False
    if zoo_dist.world_size() > 1 and not zoo_dist.is_distributed():
        dev = torch.device(device) if device is not None else model_device(model)
        ranked = zoo_dist.init_from_env(dev)
        if ranked != dev:  # one GPU per rank, as torchrun lays them out
            device = ranked
            model.to(ranked)
        we_init = zoo_dist.is_distributed()
    rank, world = zoo_dist.rank(), zoo_dist.world_size()
    try:
        if world > 1:
            for t in model.state_dict().values():  # identical weights on every rank (untrained models too)
                dist.broadcast(t, 0)
        n = len(source)
        n_shards = max(1, -(-n // shard_size))
        spec = getattr(model, "spec", None)
        config = {"model": (model_info or {}).get("name", getattr(spec, "name", None)), "model_info": model_info,
                  "inputs": source.fingerprint(), "total": n, "shard_size": shard_size, "n_shards": n_shards,
                  "backend": backend, "precision": precision, "normalize": normalize,
                  "weights": weights_fingerprint(base_model), "preprocess": _preprocess_key(source.preprocess)}
        if model is not base_model:  # only when not the default, so folders written before still resume
            config.update(layer=model.layer, pool=model.pool)
            if model.pool == "none":
                config["map_shape"] = list(model.map_shape)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        cfg_path = out / "config.json"
        if rank == 0:
            if cfg_path.exists():
                refuse_other_run(out, _read_json(cfg_path), config)  # before config.json is touched
            atomic_write_json(cfg_path, config)
        if world > 1:
            dist.barrier()
        done = _finished_shards(out, n_shards)
        mine = [s for s in range(n_shards) if s % world == rank and s not in done]
        if done and rank == 0:
            log.info("resuming %s: %d of %d shards already finished", out, len(done), n_shards)
        runner = checked_runner(model, backend, precision, device)
        # Batches never cross a shard boundary, so each shard is written as soon as its last batch is in.
        batches, owner = [], []
        for s in mine:
            lo, hi = s * shard_size, min((s + 1) * shard_size, n)
            for b in range(lo, hi, bs):
                batches.append(list(range(b, min(b + bs, hi))))
                owner.append(s)
        remaining = {s: sum(1 for o in owner if o == s) for s in mine}
        acc: dict[int, dict[str, list]] = {s: {"f": [], "idx": [], "failed": [], "labels": []} for s in mine}
        workers = default_workers(source, len(batches)) if num_workers is None else int(num_workers)
        source.device = runner_device(runner) if workers == 0 else None  # worker processes stay off the GPU
        desc = f"embed rank {rank}/{world}" if world > 1 else "embed"
        for b, (kept, f, bad, lab) in enumerate(run_batches(source, batches, runner, normalize, workers,
                                                             progress, desc)):
            s = owner[b]
            a = acc[s]
            if kept:
                a["f"].append(f.numpy())
                a["idx"].extend(kept)
                a["labels"].extend(lab.tolist())
            a["failed"].extend((_jsonable(source.id(i)), reason) for i, reason in bad)
            remaining[s] -= 1
            if remaining[s] == 0:
                _finish_shard(out, s, shard_size, n, acc.pop(s), source, model, rank)
                if rank == 0 and world == 1:
                    _write_index(out, config, n_shards, complete=False)
        for s in [s for s in mine if remaining.get(s) == 0 and s in acc]:  # shards with no batch (n == 0)
            _finish_shard(out, s, shard_size, n, acc.pop(s), source, model, rank)
        if world > 1:
            dist.barrier()
        index = None
        if rank == 0:
            if len(_finished_shards(out, n_shards)) != n_shards:
                raise EmbedError(f"{out}: some shards are missing after the run; run the same command again to "
                                 f"finish them")
            index = _write_index(out, config, n_shards, complete=True)
            if merge:
                index = merge_shards(out)
        if world > 1:
            dist.barrier()
            if rank != 0:
                index = json.loads((out / "index.json").read_text())
        return index
    finally:
        if we_init:
            dist.destroy_process_group()


def _finish_shard(out: Path, s: int, shard_size: int, n: int, a: dict, source: Source, model: torch.nn.Module,
                  rank: int) -> None:
    d = a["f"][0].shape[1] if a["f"] else getattr(model, "feature_dim", 0)
    feats = np.concatenate(a["f"]) if a["f"] else np.zeros((0, d), np.float32)
    name = shard_name(s)
    atomic_save_npy(out / "shards" / f"{name}.npy", feats)
    labels = a["labels"] if a["labels"] and min(a["labels"]) >= 0 and source.labelled else None
    meta = {"start": s * shard_size, "stop": min((s + 1) * shard_size, n), "count": int(feats.shape[0]),
            "dim": int(d), "ids": [_jsonable(source.id(i)) for i in a["idx"]], "failed": a["failed"],
            "labels": labels, "rank": rank}
    atomic_write_json(out / "shards" / f"{name}.json", meta)  # the marker: written after the features


def _load_rows(npy: Path, n_ids: int, ids_file: str, fix: str, mmap: bool = False) -> np.ndarray:
    """A features .npy whose rows must match its ids; damage or a row count off is one line with `fix`."""
    try:
        feats = np.load(npy, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise EmbedError(f"{npy} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"{fix}") from None
    if feats.ndim != 2 or feats.shape[0] != n_ids:
        raise EmbedError(f"{npy} holds {feats.shape[0] if feats.ndim else 0} rows but {ids_file} lists {n_ids} "
                         f"ids; {fix}")
    return feats


def iter_shards(out: str | os.PathLike, mmap: bool = True) -> Iterator[tuple[np.ndarray, list[Any], dict]]:
    """(features, ids, shard metadata) of each finished shard of an `embed_to_dir` folder, in input order.

    Features are memory-mapped by default, so a corpus larger than memory can be streamed.
    """
    out = Path(out)
    index = _read_json(out / "index.json")
    for sh in index["shards"]:
        meta = _read_json(out / "shards" / f"{sh['name']}.json")
        npy = out / "shards" / f"{sh['name']}.npy"
        feats = _load_rows(npy, len(meta["ids"]), "its .json", "delete both, then run the same `zoo embed` again "
                           "to redo it", mmap)
        yield feats, meta["ids"], meta


def merge_shards(out: str | os.PathLike) -> dict:
    """Concatenate the shards of a complete `embed_to_dir` folder into `features.npy` + `ids.json`, streaming."""
    out = Path(out)
    index = _read_json(out / "index.json")
    if not index.get("complete"):
        raise EmbedError(f"{out} is not complete ({index['finished']} of {index['n_shards']} shards); run the "
                         f"embedding again to finish it")
    total, dim = index["embedded"], index["dim"] or 0
    tmp = out / ".features.npy.tmp"
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, dim))
    ids, failed, labels, row = [], [], [], 0
    for feats, shard_ids, meta in iter_shards(out):
        arr[row: row + len(feats)] = feats
        row += len(feats)
        ids.extend(shard_ids)
        failed.extend(meta["failed"])
        labels = None if labels is None or meta.get("labels") is None else labels + meta["labels"]
    arr.flush()
    del arr
    os.replace(tmp, out / "features.npy")
    atomic_write_json(out / "ids.json", {"ids": ids, "failed": failed, "labels": labels})
    index["merged"] = True
    atomic_write_json(out / "index.json", index)
    return index


def read_embeddings(out: str | os.PathLike) -> Embeddings:
    """The `Embeddings` of an `embed_to_dir` folder (merged file if present, else the shards concatenated)."""
    out = Path(out)
    config = _read_json(out / "config.json") if (out / "config.json").exists() else {}
    shape = tuple(config["map_shape"]) if config.get("map_shape") else None
    if (out / "features.npy").exists() and (out / "ids.json").exists():
        meta = _read_json(out / "ids.json")
        feats = torch.from_numpy(np.asarray(_load_rows(out / "features.npy", len(meta["ids"]), str(out / "ids.json"),
                                                       f"delete both and run zoo.shards.merge_shards({str(out)!r})")))
        labels = None if meta.get("labels") is None else torch.tensor(meta["labels"], dtype=torch.int64)
        return Embeddings(feats, meta["ids"], [tuple(x) for x in meta["failed"]], labels, shape)
    parts, ids, failed, labels = [], [], [], []
    for feats, shard_ids, meta in iter_shards(out, mmap=False):
        parts.append(feats)
        ids.extend(shard_ids)
        failed.extend(tuple(x) for x in meta["failed"])
        labels = None if labels is None or meta.get("labels") is None else labels + meta["labels"]
    feats = torch.from_numpy(np.concatenate(parts)) if parts else torch.empty(0, 0)
    return Embeddings(feats, ids, failed, None if labels is None else torch.tensor(labels, dtype=torch.int64), shape)
