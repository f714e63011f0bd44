"""`zoo.Index`: a FAISS index that keeps your ids, saves atomically, and says clearly what went wrong.

    index = zoo.Index(256, metric="cosine", kind="hnsw")
    index.add(emb.features, emb.ids)
    scores, ids = index.search(queries, k=10)
    index.save("my-index"); index = zoo.Index.load("my-index")

Kinds (or any FAISS factory string; `{nlist}` in it is replaced by the chosen list count):

| kind   | FAISS                | notes                                                              |
|--------|----------------------|--------------------------------------------------------------------|
| `flat` | `Flat`               | exact                                                              |
| `ivf`  | `IVF{nlist},Flat`    | nlist = 4 sqrt(n) (at most n / 39), trained on a sample, nprobe settable |
| `hnsw` | `HNSW32`             | graph, no training, efSearch settable (default 64)                |
| `sq8`  | `SQ8`                | exhaustive on 8-bit scalar-quantized codes: 1/4 of flat's bytes    |

`metric="cosine"` L2-normalises vectors and queries and scores by inner product (higher is closer);
`metric="l2"` scores are squared Euclidean distances (lower is closer). On a machine with faiss GPU
and CUDA, `device="auto"` puts every kind but HNSW on GPU 0 (saved files are CPU indexes). The
files (`save` / `load`, and the `embed_to_dir` folders `from_shards` reads) are `zoo.index_io`'s.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from zoo.errors import IndexUsageError
from zoo.index_ids import check_k, check_unique, normalized_ids
from zoo.index_io import faiss_module, read_index_folder, read_shard_folder, sample_shard_rows, write_index_folder
from zoo.shards import iter_shards

KINDS = {"flat": "Flat", "ivf": "IVF{nlist},Flat", "hnsw": "HNSW32", "sq8": "SQ8"}
METRICS = ("cosine", "l2")
DEFAULT_EF_SEARCH = 64
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 per centroid


def default_nlist(n: int) -> int:
    """IVF list count: 4 sqrt(n), the FAISS guideline, but at least 39 training points per list."""
    return int(max(1, min(round(4 * math.sqrt(max(n, 1))), n // 39)))


def _to_matrix(vectors: Any, what: str) -> np.ndarray:
    try:
        import torch

        if torch.is_tensor(vectors):
            vectors = vectors.detach().float().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    x = np.asarray(vectors)
    if x.dtype == object:
        raise IndexUsageError(f"{what} must be a numeric array [n, dim], got an object array")
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise IndexUsageError(f"{what} must be a 2-D array [n, dim], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


class Index:
    """A FAISS index over vectors with user ids (ints or strings) and optional per-vector labels."""

    def __init__(self, dim: int, metric: str = "cosine", kind: str = "flat", device: str = "auto",
                 nlist: int | None = None, nprobe: int | None = None, ef_search: int = DEFAULT_EF_SEARCH,
                 model: Any = None):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise IndexUsageError(f"dim must be a positive int (the feature dimension), got {dim!r}")
        if metric not in METRICS:
            raise IndexUsageError(f"metric must be 'cosine' or 'l2', got {metric!r}")
        if device not in ("auto", "cpu", "cuda"):
            raise IndexUsageError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
        self.dim, self.metric, self.kind, self.device = int(dim), metric, kind, device
        self.factory_template = KINDS.get(kind, kind)
        self.nlist, self.model = nlist, model
        self._nprobe, self._ef_search = nprobe, int(ef_search)
        self._index = None  # built at the first train/add, when n (hence nlist) is known
        self._gpu = False
        self.factory: str | None = None
        self._ids: list[Any] = []
        self.labels: list[Any] | None = None

    # ---------------------------------------------------------------- construction
    def _build(self, n_hint: int) -> None:
        faiss = faiss_module()
        if "{nlist}" in self.factory_template:
            self.nlist = int(self.nlist or default_nlist(n_hint))
        self.factory = self.factory_template.replace("{nlist}", str(self.nlist))
        metric = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        try:
            index = faiss.index_factory(self.dim, self.factory, metric)
        except RuntimeError as e:
            raise IndexUsageError(f"FAISS cannot build {self.factory!r} for dim {self.dim}: "
                                  f"{str(e).strip().splitlines()[-1]}; use one of {', '.join(KINDS)} or a valid "
                                  f"factory string") from None
        self._index = self._maybe_gpu(index)
        self._apply_search_params()

    def _maybe_gpu(self, index):
        faiss = faiss_module()
        has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self.device == "cuda" and not has_gpu:
            raise IndexUsageError("device='cuda' but this faiss has no GPU support or no GPU is visible; install "
                                  "faiss-gpu (pip install 'ssl-zoo[gpu]') or use device='auto'")
        if self.device == "cpu" or not has_gpu or "HNSW" in (self.factory or ""):
            return index
        self._res = faiss.StandardGpuResources()
        try:
            gpu = faiss.index_cpu_to_gpu(self._res, 0, index)
        except RuntimeError:  # a kind without a GPU implementation stays on CPU
            return index
        self._gpu = True
        return gpu

    def _cpu_index(self):
        return faiss_module().index_gpu_to_cpu(self._index) if self._gpu else self._index

    def _apply_search_params(self) -> None:
        faiss = faiss_module()
        if self._index is None:
            return
        if self.nlist:
            if self._nprobe is None:
                self._nprobe = int(min(self.nlist, max(8, self.nlist // 64)))
            if self._gpu:
                faiss.GpuParameterSpace().set_index_parameter(self._index, "nprobe", int(self._nprobe))
            else:
                try:
                    faiss.extract_index_ivf(self._index).nprobe = int(self._nprobe)
                except RuntimeError:
                    pass
        try:
            hnsw = faiss.downcast_index(self._index)
            if hasattr(hnsw, "hnsw"):
                hnsw.hnsw.efSearch = int(self._ef_search)
        except RuntimeError:
            pass

    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query (recall vs speed)."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self._nprobe = int(value)
        self._apply_search_params()

    @property
    def ef_search(self) -> int:
        """HNSW candidate list size per query (recall vs speed)."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = int(value)
        self._apply_search_params()

    @property
    def ntotal(self) -> int:
        return 0 if self._index is None else int(self._index.ntotal)

    def __len__(self) -> int:
        return self.ntotal

    @property
    def ids(self) -> list[Any]:
        return self._ids

    def __repr__(self) -> str:
        return (f"Index(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}, factory={self.factory!r}, "
                f"ntotal={self.ntotal}, device={'cuda' if self._gpu else 'cpu'})")

    # ---------------------------------------------------------------- data
    def _prepare(self, vectors: Any, what: str) -> np.ndarray:
        x = _to_matrix(vectors, what)
        if x.shape[1] != self.dim:
            model = f" (model {self.model_name})" if self.model_name else ""
            raise IndexUsageError(f"{what} have dimension {x.shape[1]} but the index holds {self.dim}-d vectors"
                                  f"{model}; embed them with the same model")
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise IndexUsageError(f"{len(bad)} of the {what} contain NaN or inf (first at row {bad[0]}); drop or "
                                  f"re-embed them before indexing")
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    @property
    def model_name(self) -> str | None:
        m = self.model
        return m.get("name") if isinstance(m, dict) else m

    @property
    def is_trained(self) -> bool:
        return self._index is not None and bool(self._index.is_trained)

    def train(self, sample: Any, n_expected: int | None = None) -> None:
        """Train (IVF centroids, SQ ranges) on a sample; `n_expected` sizes nlist for the final count."""
        x = self._prepare(sample, "training vectors")
        if self._index is None:
            self._build(n_expected or len(x))
        if not self._index.is_trained:
            need = max(1, self.nlist or 1)
            if len(x) < need:
                raise IndexUsageError(f"{self.factory} needs at least {need} training vectors, got {len(x)}; add more "
                                      f"vectors or pass a smaller nlist=")
            try:
                self._index.train(x)
            except RuntimeError as e:  # e.g. PQ needs >= 256 training points per codebook
                msg = str(e).strip().splitlines()[-1].split("failed: ")[-1]
                raise IndexUsageError(f"training {self.factory} on {len(x)} vectors failed: {msg}") from None

    def add(self, vectors: Any, ids: Sequence[Any] | None = None, labels: Sequence[Any] | None = None,
            train_size: int | None = None) -> None:
        """Add vectors `[n, dim]` with their ids (default: running positions) and optional labels.

        An untrained index (IVF, SQ) is first trained on a random sample of these vectors
        (`train_size`, default 40 points per IVF list, at most all of them).
        """
        x = self._prepare(vectors, "vectors")
        if ids is None:
            ids = list(range(self.ntotal, self.ntotal + len(x)))
        ids = normalized_ids(ids)
        if len(ids) != len(x):
            raise IndexUsageError(f"got {len(x)} vectors but {len(ids)} ids; pass one id per vector")
        check_unique(ids, self._id_set())
        if labels is not None and len(labels) != len(x):
            raise IndexUsageError(f"got {len(x)} vectors but {len(labels)} labels; pass one label per vector")
        if labels is None and self.labels is not None and len(x):
            raise IndexUsageError("this index has labels: pass labels= with every add")
        if labels is not None and self.labels is None and self.ntotal:
            raise IndexUsageError("this index was started without labels; pass labels= from the first add")
        if len(x) == 0:
            return
        if self._index is None:
            self._build(len(x))
        if not self._index.is_trained:
            self.train(_sample(x, train_size or TRAIN_POINTS_PER_LIST * max(self.nlist or 1, 256 if "SQ" in
                                                                             self.factory else 1)))
        self._index.add(x)
        self._id_set().update(ids)  # kept in step, so each add checks uniqueness without rebuilding the set
        self._ids.extend(ids)
        if labels is not None:
            self.labels = (self.labels or []) + [_jsonable(v) for v in labels]

    # ---------------------------------------------------------------- search
    def search(self, queries: Any, k: int = 10, batch_size: int = 16384, progress: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
        """(scores `[q, k]`, ids `[q, k]`) of the k nearest vectors, best first; queries in batches.

        Scores: cosine similarity (`metric="cosine"`) or squared L2 distance. Ids: an int64 array when
        every id is an int, else an object array; a slot an approximate index could not fill is -1 / None.
        """
        if self.ntotal == 0:
            raise IndexUsageError("the index is empty; add vectors before searching")
        k = check_k(k)
        if k > self.ntotal:
            raise IndexUsageError(f"k={k} but the index holds {self.ntotal} vectors; ask for k <= {self.ntotal}")
        q = self._prepare(queries, "queries")
        scores = np.empty((len(q), k), np.float32)
        labels = np.empty((len(q), k), np.int64)
        starts = range(0, len(q), int(batch_size))
        if progress and len(q) > batch_size:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="search", unit="batch", file=sys.stderr)
        for s in starts:
            scores[s: s + batch_size], labels[s: s + batch_size] = self._index.search(q[s: s + batch_size], int(k))
        return scores, self._map_ids(labels)

    def _map_ids(self, positions: np.ndarray) -> np.ndarray:
        table = self._id_table()
        missing = positions < 0
        out = table[np.where(missing, 0, positions)]
        if missing.any():
            out = out.astype(object) if table.dtype == object else out
            out[missing] = None if table.dtype == object else -1
        return out

    def _id_table(self) -> np.ndarray:
        cached = getattr(self, "_table", None)
        if cached is not None and len(cached) == len(self._ids):
            return cached
        if all(isinstance(i, int) for i in self._ids):
            table = np.asarray(self._ids, dtype=np.int64)
        else:
            table = np.empty(len(self._ids), dtype=object)
            table[:] = self._ids
        self._table = table
        return table

    def _id_set(self) -> set[Any]:
        cached = getattr(self, "_set", None)
        if cached is None or len(cached) != len(self._ids):
            cached = self._set = set(self._ids)
        return cached

    def labels_of(self, ids_row: Iterable[Any]) -> list[Any]:
        """Labels of ids returned by `search` (None where unknown)."""
        if self.labels is None:
            return [None for _ in ids_row]
        pos = getattr(self, "_pos", None)
        if pos is None or len(pos) != len(self._ids):
            pos = self._pos = {i: p for p, i in enumerate(self._ids)}
        return [self.labels[pos[i]] if i in pos else None for i in ids_row]

    # ---------------------------------------------------------------- files
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write `index.faiss`, `ids.json` (or `ids.npy` for int ids), `meta.json` (+ `labels.json`).

        Into a new or empty folder or over an index folder (else refused unless `overwrite=True`);
        files that are not the index's own are never removed. See `zoo.index_io.write_index_folder`.
        """
        meta = {"dim": self.dim, "metric": self.metric, "kind": self.kind, "factory": self.factory,
                "factory_template": self.factory_template, "nlist": self.nlist, "nprobe": self._nprobe,
                "ef_search": self._ef_search, "ntotal": self.ntotal, "model": self.model}
        cpu = self._cpu_index() if self._index is not None else None
        return write_index_folder(directory, cpu, self._ids, self._id_table(), self.labels, meta, overwrite)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str = "auto") -> "Index":
        """An index written by `save` (or `zoo index build`)."""
        directory, meta, index, ids, labels = read_index_folder(directory)
        self = cls(meta["dim"], meta["metric"], meta["kind"], device=device, nlist=meta.get("nlist"),
                   nprobe=meta.get("nprobe"), ef_search=meta.get("ef_search") or DEFAULT_EF_SEARCH,
                   model=meta.get("model"))
        self.factory_template = meta.get("factory_template") or self.factory_template
        self.factory = meta.get("factory")
        if index is not None:
            self._index = self._maybe_gpu(index)
            self._apply_search_params()
        self._ids, self.labels = ids, labels
        if len(self._ids) != self.ntotal:
            raise IndexUsageError(f"{directory} is inconsistent: {self.ntotal} vectors but {len(self._ids)} ids; "
                                  f"build it again")
        return self

    @classmethod
    def from_shards(cls, directory: str | os.PathLike, metric: str = "cosine", kind: str = "flat",
                    device: str = "auto", train_size: int | None = None, progress: bool = True,
                    **kwargs: Any) -> "Index":
        """An index over an `embed_to_dir` folder, shard by shard: never all features in memory at once.

        Training (IVF, SQ) uses a random sample of rows gathered from the memory-mapped shards.
        """
        info, model = read_shard_folder(directory)
        total, dim = int(info["embedded"]), info["dim"]
        self = cls(int(dim), metric, kind, device=device, model=model, **kwargs)
        self._build(total)
        if not self._index.is_trained:
            n_train = min(total, train_size or TRAIN_POINTS_PER_LIST * max(self.nlist or 1, 256))
            self.train(sample_shard_rows(directory, total, n_train), n_expected=total)
        shards = iter_shards(directory)
        if progress:
            from tqdm.auto import tqdm

            shards = tqdm(shards, total=len(info["shards"]), desc="index", unit="shard", file=sys.stderr)
        for feats, ids, meta in shards:
            labels = meta.get("labels")
            for s in range(0, len(feats), 65536):  # bounded memory even for huge shards
                self.add(np.asarray(feats[s: s + 65536]), ids[s: s + 65536],
                         labels=None if labels is None else labels[s: s + 65536])
        return self


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def _sample(x: np.ndarray, n: int) -> np.ndarray:
    if len(x) <= n:
        return x
    rows = np.sort(np.random.default_rng(0).choice(len(x), size=n, replace=False))
    return x[rows]


def index_bytes(index: Index) -> int:
    """Bytes of the serialized FAISS index (what `save` writes for the vectors, headers included)."""
    faiss = faiss_module()
    return int(faiss.serialize_index(index._cpu_index()).size)
