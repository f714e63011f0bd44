"""`zoo bench index`: exact k-NN (FAISS vs torch vs scikit-learn) against the matmul limit, and approximate
indexes (IVF, HNSW, SQ8) against flat: queries/s, recall@10 and bytes per vector."""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import numpy as np
import torch

from zoo_cli.bench.timing import matmul_flops, median_time, say


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth))


def clustered_vectors(n: int, dim: int, n_queries: int, clusters: int = 2000, noise: float = 1.0,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Points around random centres (as embeddings of a corpus of many classes), and queries drawn alike.

    Per-dimension noise as large as the centres' spread: clusters overlap, so neighbours cross cluster
    borders and an IVF index must probe several lists (separated clusters made every index look perfect).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 100_000):  # in blocks: no 2x temporary of a 1M x 128 array
            e = min(m, s + 100_000)
            out[s:e] = centres[rng.integers(0, clusters, e - s)]
            out[s:e] += noise * rng.standard_normal((e - s, dim), dtype=np.float32)
        return out

    return draw(n), draw(n_queries)


def bench_index(exact_n: int = 100_000, exact_dim: int = 512, queries: int = 1000, k: int = 20,
                ann_n: int = 1_000_000, ann_dim: int = 128, ann_queries: int = 1000, ann_nlist: int | None = None,
                repeats: int = 3, matmul_size: int = 2048) -> dict[str, Any]:
    """Exact k-NN (FAISS vs torch vs scikit-learn) and approximate indexes (HNSW, IVF, SQ8) vs flat."""
    import faiss

    from zoo.index import Index, index_bytes

    out: dict[str, Any] = {}
    peak = matmul_flops(matmul_size)
    say(f"bench index: {faiss.omp_get_max_threads()} FAISS threads, {torch.get_num_threads()} torch threads; "
         f"best fp32 matmul {peak / 1e9:.1f} GFLOP/s; median of {repeats} runs after 1 warm-up")

    # ---- exact
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((exact_n, exact_dim), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = rng.standard_normal((queries, exact_dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flops = 2.0 * exact_n * queries * exact_dim
    limit_s = flops / peak
    say(f"\nexact k-NN: {exact_n} x {exact_dim} normalised vectors, {queries} queries, k={k}; matmul limit "
         f"{limit_s * 1e3:.1f} ms ({flops / 1e9:.1f} GFLOP)")
    flat = faiss.IndexFlatIP(exact_dim)
    flat.add(bank)
    t_faiss = median_time(lambda: flat.search(q, k), repeats)
    _, faiss_idx = flat.search(q, k)
    tb, tq = torch.from_numpy(bank), torch.from_numpy(q)

    def torch_knn():
        return [(part @ tb.T).topk(k, dim=1) for part in tq.split(256)]  # 256 x n scores at a time

    t_torch = median_time(torch_knn, repeats)
    torch_idx = torch.cat([i for _, i in torch_knn()]).numpy()
    rows = [("FAISS IndexFlatIP", t_faiss), ("torch matmul + topk", t_torch)]
    try:
        from sklearn.neighbors import NearestNeighbors

        nn_ = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(bank)
        rows.append(("scikit-learn brute force", median_time(lambda: nn_.kneighbors(q), repeats)))
    except ImportError:
        say("  scikit-learn: skipped (not installed; pip install scikit-learn to compare)")
    for label, t in rows:
        say(f"  {label:28s} {t * 1e3:9.1f} ms  {queries / t:9.0f} q/s  {limit_s / t:6.2f} of matmul limit  "
             f"{t / t_faiss:5.2f}x FAISS time")
    agree = _recall(faiss_idx, torch_idx, k)
    say(f"  FAISS vs torch top-{k} agreement {agree:.4f}")
    frac = limit_s / t_faiss
    say(f"goal: FAISS exact >= 0.8 of matmul limit: {frac:.2f} {'MET' if frac >= 0.8 else 'NOT MET'}; "
         f">= torch: {t_torch / t_faiss:.2f}x {'MET' if t_faiss <= t_torch else 'NOT MET'}")
    if frac < 0.8:
        t_gemm = median_time(lambda: q @ bank.T, 1)
        say(f"  (diagnosis: the GEMM alone, numpy's BLAS: {t_gemm * 1e3:.0f} ms; FAISS's own BLAS runs its blocks "
             f"{t_faiss / max(t_gemm, 1e-9):.1f}x slower here)")
    out["exact"] = {"faiss_s": t_faiss, "torch_s": t_torch, "limit_s": limit_s, "fraction_of_limit": frac}
    del bank, flat, tb, tq
    gc.collect()

    # ---- approximate
    x, qa = clustered_vectors(ann_n, ann_dim, ann_queries)
    kk = 10
    nlist = ann_nlist or max(1, min(1024, ann_n // 39))
    nlist_large = ann_nlist or max(1, min(2 ** round(math.log2(4 * math.sqrt(ann_n))), ann_n // 39))
    say(f"\napproximate k-NN: {ann_n} x {ann_dim} clustered vectors (2000 centres), {ann_queries} queries, "
         f"recall@{kk} against flat, cosine")
    results = []

    def build(kind: str, **kw) -> tuple[Index, float, float]:
        idx = Index(ann_dim, metric="cosine", kind=kind, device="cpu", **kw)
        t0 = time.perf_counter()
        idx.train(x[: min(ann_n, 40 * max(kw.get("nlist", nlist), 256))], n_expected=ann_n)
        empty = index_bytes(idx)
        idx.add(x)
        built = time.perf_counter() - t0
        return idx, built, (index_bytes(idx) - empty) / ann_n

    flat_i, t_build, flat_bytes = build("flat")
    t_flat = median_time(lambda: flat_i.search(qa, kk), repeats)
    _, truth = flat_i.search(qa, kk)
    flat_qps = ann_queries / t_flat
    say(f"  {'flat':26s} build {t_build:6.1f} s  {flat_qps:9.0f} q/s   1.00x flat  recall 1.0000  "
         f"{flat_bytes:6.1f} B/vector (1.00 of flat)")
    results.append(("flat", "", flat_qps, 1.0, flat_bytes))
    del flat_i
    gc.collect()
    sweeps: list[tuple[str, dict, str, list[int]]] = [
        ("ivf", {"nlist": nlist}, "nprobe", [4, 8, 16, 32, 64]),
        # FAISS's guideline for about 1M vectors: 4*sqrt(N) to 16*sqrt(N) lists (faiss wiki, "Guidelines to choose
        # an index"); the lower end, as a power of two.
        *([("ivf", {"nlist": nlist_large}, "nprobe", [8, 16, 32, 64])] if nlist_large != nlist else []),
        ("hnsw", {}, "ef_search", [16, 32, 64, 128, 256]),
        ("sq8", {}, "", [0]),
    ]
    for kind, kw, param, values in sweeps:
        idx, t_build, nbytes = build(kind, **kw)
        for v in values:
            if param:
                setattr(idx, param, v)
            t = median_time(lambda: idx.search(qa, kk), repeats)
            _, found = idx.search(qa, kk)
            r = _recall(found, truth, kk)
            qps = ann_queries / t
            label = f"{idx.factory}" + (f" {param}={v}" if param else "")
            results.append((kind, label, qps, r, nbytes))
            say(f"  {label:26s} build {t_build:6.1f} s  {qps:9.0f} q/s {qps / flat_qps:6.1f}x flat  recall "
                 f"{r:.4f}  {nbytes:6.1f} B/vector ({nbytes / flat_bytes:.2f} of flat)")
        del idx
        gc.collect()
    good = [r for r in results if r[3] >= 0.95 and r[0] != "flat"]
    fastest = max(good, key=lambda r: r[2]) if good else None
    smallest = min(good, key=lambda r: r[4]) if good else None
    if fastest:
        sp = fastest[2] / flat_qps
        say(f"goal: an approximate index >= 15x flat at recall@10 >= 0.95: {fastest[1]} {sp:.1f}x "
             f"(recall {fastest[3]:.3f}) {'MET' if sp >= 15 else 'NOT MET'}")
        ratio = smallest[4] / flat_bytes
        say(f"goal: an index <= 1/4 of flat's bytes/vector at recall@10 >= 0.95: {smallest[1]} {ratio:.3f} "
             f"(recall {smallest[3]:.3f}) {'MET' if ratio <= 0.25 + 1e-9 else 'NOT MET'}")
    else:
        say("goal: no approximate index reached recall@10 >= 0.95")
    out["approximate"] = results
    return out
