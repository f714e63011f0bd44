"""Quality checks of the low precisions (bf16, int8) against fp32, stored beside the model's cached files.

The check (`check_precision`): embed a labelled bank and query set of real images in fp32 and in the
low precision; accept when weighted k-NN top-1 (cosine, k=20, T=0.07) is within 0.5 point of fp32
and the mean recall@10 of the fp32 neighbours (low-precision neighbours of each query among the
low-precision bank vs fp32 neighbours among the fp32 bank) is >= 0.9. fp32 is the eager/frozen
torch model. Fashion-MNIST is on every machine (`dataset-fashion-mnist`): fmnist models are checked
on it; a model of another domain uses it as a stand-in, and the report says so. The result lives in
`precision.json` of the model's cache folder (`zoo.artifacts`); `require_precision` is what
`zoo.embed` asks before it runs a low precision.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np
import torch

from zoo.artifacts import (INT8_RECIPE, domain_images, model_cache_dir, model_spec, read_json,
                           weights_fingerprint)
from zoo.errors import ZooError
from zoo.fsutil import atomic_save_npy, atomic_write_json
from zoo.knn import knn_accuracy, knn_search
from zoo.runners import default_batch_size, make_runner, run_chunks

KNN_TOLERANCE = 0.5  # points of weighted k-NN top-1, either way
MIN_RECALL_AT_10 = 0.9
# Version of the check's rule and sizes: a stored check of another version is measured again.
CHECK_VERSION = 2


class PrecisionRejectedError(ZooError, ValueError):
    """A low precision failed its quality check against fp32."""


def _features(runner: Callable, model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    # Features straight from a runner, unnormalised: the check compares precisions, not preprocessing paths.
    # On the host: the comparison, the FAISS search and the cached reference are numpy (a CUDA model's
    # features would fail at .numpy()).
    return run_chunks(runner, lambda chunk: model.preprocess(chunk[:, None]), images, batch_size).cpu()


# ------------------------------------------------------------------------------------------ checks
def _check_sizes(model: torch.nn.Module) -> tuple[int, int]:
    # 2000 queries: one query is 0.05 point, so the +-0.5 rule is ten queries' worth (300 queries, 0.33
    # point each, could not tell quantization error from the luck of a few borderline images). Big
    # inputs (224 px ResNet-50: ~26 img/s fp32 on 2 cores) get a smaller bank: a few minutes, once.
    return (5000, 2000) if model_spec(model).input_size <= 64 else (3000, 2000)


def _neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    return torch.from_numpy(knn_search(bank, queries, k, metric="cosine")[1])


def _reference(model: torch.nn.Module, runner_fp32: Callable, bank_x: torch.Tensor, query_x: torch.Tensor, key: str,
               batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 features of the check images, cached on disk beside the model (the reference is reused)."""
    path = model_cache_dir(model) / f"reference-fp32-{key}.npy"
    if path.exists():
        both = torch.from_numpy(np.load(path))
        if both.shape[0] == len(bank_x) + len(query_x):
            return both[: len(bank_x)], both[len(bank_x):]
    bank = _features(runner_fp32, model, bank_x, batch_size)
    queries = _features(runner_fp32, model, query_x, batch_size)
    atomic_save_npy(path, torch.cat([bank, queries]).numpy())
    return bank, queries


def check_precision(model: torch.nn.Module, precision: str, force: bool = False,
                    sizes: tuple[int, int] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Measure `precision` ("bf16" or "int8") against fp32 on real images; stored in `precision.json`."""
    if precision not in ("bf16", "int8"):
        raise ValueError(f"precision must be 'bf16' or 'int8', got {precision!r}")
    d = model_cache_dir(model)
    report_path = d / "precision.json"
    report = read_json(report_path)
    entry = report.get(precision)
    # A stored check is reused whatever its size, unless sizes= asks for another one (or force=), or it
    # was made under an older rule or, for int8, on a file of an older recipe.
    current = (entry and entry.get("check_version") == CHECK_VERSION
               and (precision != "int8" or entry.get("int8_recipe") == INT8_RECIPE))
    if current and not force and (sizes is None or (entry.get("n_bank"), entry.get("n_queries")) == tuple(sizes)):
        return entry
    n_bank, n_queries = sizes or _check_sizes(model)
    spec = model_spec(model)
    bank_x, bank_y, what = domain_images(model, "train", n_bank)
    query_x, query_y, _ = domain_images(model, "test", n_queries)
    what = what.replace(" train", " train (bank) + test (queries)", 1)
    bs = default_batch_size(model)
    if verbose:
        print(f"checking {precision} for {spec.name} against fp32 on {n_bank} + {n_queries} images "
              f"({what}); once, then cached in {report_path}", file=sys.stderr)
    ref_bank, ref_q = _reference(model, make_runner(model, "torch", "fp32"), bank_x, query_x,
                                 f"{n_bank}-{n_queries}", bs)
    low = make_runner(model, "onnxruntime" if precision == "int8" else "torch", precision)
    low_bank, low_q = _features(low, model, bank_x, bs), _features(low, model, query_x, bs)
    knn_ref = knn_accuracy(ref_bank, bank_y, ref_q, query_y, k=20, temperature=0.07)
    knn_low = knn_accuracy(low_bank, bank_y, low_q, query_y, k=20, temperature=0.07)
    nn_ref, nn_low = _neighbours(ref_bank, ref_q, 10), _neighbours(low_bank, low_q, 10)
    recall = float(np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(nn_ref, nn_low)]))
    # Rounded: accuracies are multiples of 100 / n_queries, and 74.3 - 74.8 must count as 0.5.
    accepted = bool(round(abs(knn_low - knn_ref), 4) <= KNN_TOLERANCE and round(recall, 4) >= MIN_RECALL_AT_10)
    entry = {"precision": precision, "accepted": accepted, "knn_k20": round(knn_low, 3),
             "knn_k20_fp32": round(knn_ref, 3), "knn_delta": round(knn_low - knn_ref, 3),
             "recall_at_10": round(recall, 4), "n_bank": n_bank, "n_queries": n_queries, "data": what,
             "rule": f"|knn delta| <= {KNN_TOLERANCE} and recall@10 >= {MIN_RECALL_AT_10}",
             "check_version": CHECK_VERSION,
             "max_abs_diff": float((low_q - ref_q).abs().max()),
             "mean_cosine_to_fp32": float(torch.nn.functional.cosine_similarity(low_q, ref_q, dim=1).mean())}
    if precision == "int8":
        entry["int8_recipe"] = INT8_RECIPE
    report = read_json(report_path)  # re-read: another precision may have been checked meanwhile
    report[precision] = entry
    report["model"] = spec.name
    atomic_write_json(report_path, report)
    return entry


def describe(entry: dict) -> str:
    """One line with a check's numbers."""
    return (f"k-NN top-1 {entry['knn_k20']:.2f} vs fp32 {entry['knn_k20_fp32']:.2f} "
            f"(delta {entry['knn_delta']:+.2f}, limit +-{KNN_TOLERANCE}), recall@10 of fp32 neighbours "
            f"{entry['recall_at_10']:.3f} (limit >= {MIN_RECALL_AT_10}) on {entry['n_queries']} queries / "
            f"{entry['n_bank']} bank, {entry['data']}")


_announced: set[tuple[str, str, str]] = set()


def require_precision(model: torch.nn.Module, precision: str) -> dict[str, Any]:
    """The stored (or freshly measured) check of `precision`; raises `PrecisionRejectedError` if it failed."""
    entry = check_precision(model, precision)
    name = model_spec(model).name
    if not entry["accepted"]:
        raise PrecisionRejectedError(f"{precision} is refused for {name}: {describe(entry)}; use precision='fp32'")
    key = (name, weights_fingerprint(model), precision)
    if key not in _announced:  # the numbers, once per process
        _announced.add(key)
        print(f"{precision} accepted for {name}: {describe(entry)}", file=sys.stderr)
    return entry
