"""Benchmarks measured side by side in one run: `zoo bench embed`, `zoo bench index`.

Every figure of a table comes from the same process, the same inputs and the same minutes, so the
ratios hold on a busy machine even when the absolute numbers move. Throughput is the median of
per-batch (per-search) times after a warm-up, which shrugs off a neighbour's burst better than a
mean. The machine limit divides the best measured fp32 matmul FLOP/s (torch.mm, 2048^3, the
fastest of several runs) by the model's FLOPs per image (torch's FLOP counter, 2 per MAC).
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1, min_seconds: float = 1.0) -> float:
    """Median seconds of `fn` over at least `repeats` calls and at least `min_seconds` of calls.

    The time floor matters for small models: 4 batches of a 28-px net last ~40 ms, where one
    scheduler hiccup moved a ratio by 2x between runs.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    while len(times) < max(1, repeats) or sum(times) < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_flops(size: int = 2048, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of torch on this machine (all intra-op threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


def model_flops(model: torch.nn.Module, size: int) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ embed
def _bench_model(name: str, batch_size: int, batches: int, check: bool, image_size: int | None,
                 peak: float, variants: Sequence[str]) -> dict[str, Any]:
    import copy
    from dataclasses import replace

    import zoo
    from zoo.datasets import load_fashion_mnist
    from zoo.embed import OrtRunner, TorchRunner
    from zoo.preprocess import Preprocess

    spec = zoo.get_spec(name)
    torch.manual_seed(0)
    pretrained = bool(spec.has_weights)
    model = zoo.load(name, pretrained=pretrained, device="cpu")
    if image_size:  # a smaller input for smoke tests; the cache key follows the spec's size
        model.spec = replace(model.spec, input_size=image_size, resize_size=image_size)
        model.preprocess = Preprocess.from_spec(model.spec)
    size = model.spec.input_size
    images, _ = load_fashion_mnist("test")
    x = model.preprocess(images[:batch_size, None]).contiguous()
    flops = model_flops(model, size)
    limit = peak / flops
    _say(f"\n{model.spec.name} ({model.spec.arch}, {'trained' if pretrained else 'untrained'} weights), "
         f"{size} px, batch {batch_size}, {flops / 1e9:.2f} GFLOP/image -> machine limit {limit:.1f} img/s "
         f"at {peak / 1e9:.0f} GFLOP/s fp32")
    rows: list[tuple[str, float, str]] = []

    def run(label: str, fn: Callable[[], Any], note: str = "") -> None:
        t = _median_time(fn, batches)
        rows.append((label, batch_size / t, note))
        _say(f"  {label:44s} {batch_size / t:8.1f} img/s   {100 * batch_size / t / limit:5.1f}% of limit  {note}")

    if "eager" in variants:
        eager = copy.deepcopy(model).eval()
        with torch.no_grad():
            run("eager fp32 (no_grad, NCHW)", lambda: eager(x))
        del eager
    if "channels_last" in variants:
        cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            run("eager fp32 channels_last + inference_mode", lambda: cl(xc))
        del cl
    ort_fp32 = None
    if "onnxruntime" in variants:
        from zoo.onnx import onnx_session
        from zoo.quantize import onnx_path

        session = onnx_session(onnx_path(model), device="cpu")
        xn = x.numpy()
        run("onnxruntime fp32 (plain session)", lambda: session.run(["features"], {"images": xn}))
        ort_fp32 = rows[-1][1]
    ours_fp32: dict[str, float] = {}
    if "torch" in variants:
        runner = TorchRunner(model, torch.device("cpu"), "fp32")
        kind = "frozen TorchScript/oneDNN" if runner.graph is not None else "eager channels_last"
        run(f"ours: backend=torch fp32 ({kind})", lambda: runner(x))
        ours_fp32["torch"] = rows[-1][1]
    if "onnxruntime" in variants:  # our runner: tensor in, tensor out, around the same session
        ort_runner = OrtRunner(session)
        run("ours: backend=onnxruntime fp32", lambda: ort_runner(x))
        ours_fp32["onnxruntime"] = rows[-1][1]
    accepted: dict[str, float] = {}
    for precision in [p for p in ("bf16", "int8") if p in variants]:
        status = "not checked (--no-check)"
        if check:
            from zoo.quantize import check_precision, describe

            entry = check_precision(model, precision)
            status = ("ACCEPTED" if entry["accepted"] else "REFUSED") + ": " + describe(entry)
        if precision == "bf16":
            runner16 = TorchRunner(model, torch.device("cpu"), "bf16")
            run("ours: backend=torch bf16 (autocast)", lambda: runner16(x), status)
        else:
            from zoo.onnx import onnx_session
            from zoo.quantize import int8_onnx_path

            r8 = OrtRunner(onnx_session(int8_onnx_path(model), device="cpu"))
            run("ours: onnxruntime int8 (static QDQ)", lambda: r8(x), status)
        if status.startswith("ACCEPTED"):
            accepted[precision] = rows[-1][1]
    base = rows[0][1]
    _say(f"  ratios vs {rows[0][0]}: " + ", ".join(f"{label.split(' (')[0]} {v / base:.2f}x" for label, v, _ in rows))
    if ort_fp32:
        _say(f"  ratios vs onnxruntime fp32: " + ", ".join(f"{label.split(' (')[0]} {v / ort_fp32:.2f}x"
                                                        for label, v, _ in rows))
    return {"model": model.spec.name, "rows": rows, "ort_fp32": ort_fp32, "ours_fp32": ours_fp32,
            "accepted": accepted, "limit": limit, "goal_3x": model.spec.arch == "resnet50"}


def bench_embed(models: Sequence[str] = ("wmse-resnet50", "wmse-resnet18_narrow.fmnist"), batch_size: int = 32,
                batches: int = 4, check: bool = True, image_size: int | None = None,
                variants: Sequence[str] = ("eager", "channels_last", "onnxruntime", "torch", "bf16", "int8"),
                matmul_size: int = 2048) -> list[dict[str, Any]]:
    """Embedding throughput per model: eager fp32, channels_last, onnxruntime fp32, ours (fp32, bf16, int8)."""
    peak = matmul_flops(matmul_size)
    _say(f"bench embed: {torch.get_num_threads()} torch threads; best fp32 matmul {peak / 1e9:.1f} GFLOP/s; "
         f"median of >= {batches} batches and >= 1 s per variant, after 1 warm-up")
    results = []
    for name in models:
        res = _bench_model(name, batch_size, batches, check, image_size, peak, variants)
        results.append(res)
        gc.collect()
    for res in results:
        if res["ort_fp32"] and res["ours_fp32"]:
            best = max(res["ours_fp32"], key=res["ours_fp32"].get)
            r = res["ours_fp32"][best] / res["ort_fp32"]
            others = ", ".join(f"backend={b} {v / res['ort_fp32']:.2f}x" for b, v in res["ours_fp32"].items())
            _say(f"goal {res['model']}: our fp32 path >= onnxruntime fp32: best backend={best} {r:.2f}x "
                 f"{'MET' if r >= 0.98 else 'NOT MET'} ({others}; 2% = timing noise of one run)")
        if res["ort_fp32"] and res["accepted"]:
            best = max(res["accepted"], key=res["accepted"].get)
            r = res["accepted"][best] / res["ort_fp32"]
            if res["goal_3x"]:  # the issue sets the 3x goal for ResNet-50 only
                _say(f"goal {res['model']}: best accepted precision ({best}) >= 3x onnxruntime fp32: {r:.2f}x "
                     f"{'MET' if r >= 3 else 'NOT MET'}")
            else:
                _say(f"{res['model']}: best accepted precision ({best}) {r:.2f}x onnxruntime fp32")
        elif res["ort_fp32"] and res["goal_3x"]:
            _say(f"goal {res['model']}: best accepted precision >= 3x onnxruntime fp32: NOT MET (no low "
                 f"precision passed its quality check)")
    return results


# ------------------------------------------------------------------------------------------ index
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
    _say(f"bench index: {faiss.omp_get_max_threads()} FAISS threads, {torch.get_num_threads()} torch threads; "
         f"best fp32 matmul {peak / 1e9:.1f} GFLOP/s; median of {repeats} runs after 1 warm-up")

    # ---- exact
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((exact_n, exact_dim), dtype=np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    q = rng.standard_normal((queries, exact_dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    flops = 2.0 * exact_n * queries * exact_dim
    limit_s = flops / peak
    _say(f"\nexact k-NN: {exact_n} x {exact_dim} normalised vectors, {queries} queries, k={k}; matmul limit "
         f"{limit_s * 1e3:.1f} ms ({flops / 1e9:.1f} GFLOP)")
    flat = faiss.IndexFlatIP(exact_dim)
    flat.add(bank)
    t_faiss = _median_time(lambda: flat.search(q, k), repeats)
    _, faiss_idx = flat.search(q, k)
    tb, tq = torch.from_numpy(bank), torch.from_numpy(q)

    def torch_knn():
        return [(part @ tb.T).topk(k, dim=1) for part in tq.split(256)]  # 256 x n scores at a time

    t_torch = _median_time(torch_knn, repeats)
    torch_idx = torch.cat([i for _, i in torch_knn()]).numpy()
    rows = [("FAISS IndexFlatIP", t_faiss), ("torch matmul + topk", t_torch)]
    try:
        from sklearn.neighbors import NearestNeighbors

        nn_ = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(bank)
        rows.append(("scikit-learn brute force", _median_time(lambda: nn_.kneighbors(q), repeats)))
    except ImportError:
        _say("  scikit-learn: skipped (not installed; pip install scikit-learn to compare)")
    for label, t in rows:
        _say(f"  {label:28s} {t * 1e3:9.1f} ms  {queries / t:9.0f} q/s  {limit_s / t:6.2f} of matmul limit  "
             f"{t / t_faiss:5.2f}x FAISS time")
    agree = _recall(faiss_idx, torch_idx, k)
    _say(f"  FAISS vs torch top-{k} agreement {agree:.4f}")
    frac = limit_s / t_faiss
    _say(f"goal: FAISS exact >= 0.8 of matmul limit: {frac:.2f} {'MET' if frac >= 0.8 else 'NOT MET'}; "
         f">= torch: {t_torch / t_faiss:.2f}x {'MET' if t_faiss <= t_torch else 'NOT MET'}")
    if frac < 0.8:
        t_gemm = _median_time(lambda: q @ bank.T, 1)
        _say(f"  (diagnosis: the GEMM alone, numpy's BLAS: {t_gemm * 1e3:.0f} ms; FAISS's own BLAS runs its blocks "
             f"{t_faiss / max(t_gemm, 1e-9):.1f}x slower here)")
    out["exact"] = {"faiss_s": t_faiss, "torch_s": t_torch, "limit_s": limit_s, "fraction_of_limit": frac}
    del bank, flat, tb, tq
    gc.collect()

    # ---- approximate
    x, qa = clustered_vectors(ann_n, ann_dim, ann_queries)
    kk = 10
    nlist = ann_nlist or max(1, min(1024, ann_n // 39))
    nlist_large = ann_nlist or max(1, min(2 ** round(math.log2(4 * math.sqrt(ann_n))), ann_n // 39))
    _say(f"\napproximate k-NN: {ann_n} x {ann_dim} clustered vectors (2000 centres), {ann_queries} queries, "
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
    t_flat = _median_time(lambda: flat_i.search(qa, kk), repeats)
    _, truth = flat_i.search(qa, kk)
    flat_qps = ann_queries / t_flat
    _say(f"  {'flat':26s} build {t_build:6.1f} s  {flat_qps:9.0f} q/s   1.00x flat  recall 1.0000  "
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
            t = _median_time(lambda: idx.search(qa, kk), repeats)
            _, found = idx.search(qa, kk)
            r = _recall(found, truth, kk)
            qps = ann_queries / t
            label = f"{idx.factory}" + (f" {param}={v}" if param else "")
            results.append((kind, label, qps, r, nbytes))
            _say(f"  {label:26s} build {t_build:6.1f} s  {qps:9.0f} q/s {qps / flat_qps:6.1f}x flat  recall "
                 f"{r:.4f}  {nbytes:6.1f} B/vector ({nbytes / flat_bytes:.2f} of flat)")
        del idx
        gc.collect()
    good = [r for r in results if r[3] >= 0.95 and r[0] != "flat"]
    fastest = max(good, key=lambda r: r[2]) if good else None
    smallest = min(good, key=lambda r: r[4]) if good else None
    if fastest:
        sp = fastest[2] / flat_qps
        _say(f"goal: an approximate index >= 15x flat at recall@10 >= 0.95: {fastest[1]} {sp:.1f}x "
             f"(recall {fastest[3]:.3f}) {'MET' if sp >= 15 else 'NOT MET'}")
        ratio = smallest[4] / flat_bytes
        _say(f"goal: an index <= 1/4 of flat's bytes/vector at recall@10 >= 0.95: {smallest[1]} {ratio:.3f} "
             f"(recall {smallest[3]:.3f}) {'MET' if ratio <= 0.25 + 1e-9 else 'NOT MET'}")
    else:
        _say("goal: no approximate index reached recall@10 >= 0.95")
    out["approximate"] = results
    return out


if __name__ == "__main__":  # python -m zoo.bench embed|index
    from zoo.commands import main

    sys.exit(main(["bench", *sys.argv[1:]]))
