"""Per-model artefacts in the user cache: the ONNX file, its int8 quantization, and precision checks.

Everything lives in `~/.cache/ssl-zoo/<name>/<weights-fingerprint>/` (`$SSL_ZOO_CACHE` or
`$XDG_CACHE_HOME/ssl-zoo` move the root). The fingerprint is a sha256 of the weights, so an untrained
model, a fine-tuned one and the published one never share files:

- `model.onnx` (exported once with `zoo.onnx.export_onnx`, parity-checked against PyTorch) + `onnx.json`;
- `model.int8.onnx`: onnxruntime static quantization, QDQ format, int8 per-channel weights, uint8
  activations calibrated on a few hundred real images of the model's training domain (min/max with a
  moving average over calibration batches); `onnx.json` records the recipe, and a file made with an
  older recipe is made again;
- `precision.json`: the quality check of each low precision against fp32, and whether it was accepted.

The check (`check_precision`): embed a labelled bank and query set of real images in fp32 and in the
low precision; accept when weighted k-NN top-1 (cosine, k=20, T=0.07) is within 0.5 point of fp32
and the mean recall@10 of the fp32 neighbours (low-precision neighbours of each query among the
low-precision bank vs fp32 neighbours among the fp32 bank) is >= 0.9. fp32 is the eager/frozen
torch model. Fashion-MNIST is on every machine (`dataset-fashion-mnist`): fmnist models are checked
and calibrated on it; a model of another domain uses it as a stand-in unless `data=` is given, and
the report says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.errors import ZooError, require

log = logging.getLogger("zoo")

KNN_TOLERANCE = 0.5  # points of weighted k-NN top-1, either way
MIN_RECALL_AT_10 = 0.9
CALIBRATION_IMAGES = 600
# Activation ranges: per-batch min/max averaged over the 16-image calibration batches (onnxruntime's
# CalibMovingAverage) rather than the extremes of all images. Measured on the ResNet-50 at 224 px
# (3000 bank / 2000 queries, against fp32): global min/max on 300 images k-NN -0.55, recall@10 0.876
# (refused); moving average 0.01 on 300 images -0.30, 0.902; on 600 images +0.20, 0.924 (mean cosine to
# fp32 0.99885 -> 0.99966). Percentile/entropy calibration keep whole activation tensors and run out of
# memory at 224 px on this machine.
MOVING_AVERAGE_CONSTANT = 0.01
INT8_RECIPE = f"qdq-s8w-perchannel-u8a-minmax-ma{MOVING_AVERAGE_CONSTANT}-{CALIBRATION_IMAGES}img"
# Version of the check's rule and sizes: a stored check of another version is measured again.
CHECK_VERSION = 2


class PrecisionRejectedError(ZooError, ValueError):
    """A low precision failed its quality check against fp32."""


def cache_root() -> Path:
    env = os.environ.get("SSL_ZOO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-zoo"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's tensors (names, dtypes, shapes, values); cached until the weights change."""
    from zoo.embed import _params_version

    version = _params_version(model)
    cached = getattr(model, "_zoo_fingerprint", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    digest = h.hexdigest()
    object.__setattr__(model, "_zoo_fingerprint", (version, digest))
    return digest


def _spec(model: torch.nn.Module):
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ZooError("ONNX and low-precision backends need a model from zoo.load (it carries .spec: name, "
                       "input size, training domain)")
    return spec


def model_cache_dir(model: torch.nn.Module) -> Path:
    """`<cache>/<name>/<first 12 hex of the weights' sha256>/`, created."""
    # The input size is part of the key: an ONNX graph is exported for one size.
    d = cache_root() / _spec(model).name / f"{weights_fingerprint(model)[:12]}-{_spec(model).input_size}px"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, obj: dict) -> None:
    from zoo.embed import _atomic_write_json

    _atomic_write_json(path, obj)


# ------------------------------------------------------------------------------------------ real images
def domain_images(model: torch.nn.Module, split: str, n: int, from_end: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`n` uint8 images `[n, 28, 28]`, labels, and a description of the data, for checks and calibration.

    Fashion-MNIST for every model: the training domain of fmnist models, a stand-in (said in the
    description) for the others, whose datasets are not on the machine.
    """
    from zoo.datasets import load_fashion_mnist

    images, labels = load_fashion_mnist(split)
    n = min(n, len(images))
    sl = slice(len(images) - n, None) if from_end else slice(0, n)
    spec = _spec(model)
    what = f"Fashion-MNIST {split}"
    if spec.tag != "fmnist":
        what += f" (stand-in: no {spec.dataset} images on this machine)"
    return images[sl], labels[sl], what


def _features(runner, model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [runner(model.preprocess(chunk[:, None])) for chunk in images.split(batch_size)]
    return torch.cat(out).float()


# ------------------------------------------------------------------------------------------ ONNX files
def onnx_path(model: torch.nn.Module) -> Path:
    """The model's fp32 ONNX file in the cache: exported and parity-checked on real images the first time."""
    from zoo.onnx import check_onnx_parity, export_onnx

    d = model_cache_dir(model)
    path = d / "model.onnx"
    if path.exists():
        return path
    spec = _spec(model)
    cpu = model if all(p.device.type == "cpu" for p in model.parameters()) else __import__("copy").deepcopy(model).cpu()
    log.info("exporting %s to %s", spec.name, path)
    export_onnx(cpu, path, spec.input_size)
    images, _, what = domain_images(model, "test", 8)
    inputs = model.preprocess(images[:, None])
    with torch.no_grad():
        scale = float(cpu.eval()(inputs).abs().max())
    # fp32 rounding grows with the features' magnitude (untrained nets reach 1e2+): tolerance relative to it.
    atol = 1e-4 * max(1.0, scale)
    try:
        diff = check_onnx_parity(cpu, path, inputs, atol=atol)
    except Exception:
        path.unlink(missing_ok=True)
        raise
    _write_json(d / "onnx.json", {"model": spec.name, "parity_max_abs_diff": diff, "atol": atol,
                                  "feature_max_abs": scale, "parity_inputs": f"8 images, {what}"})
    return path


def _cpu_has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def _tail_after_last_conv(path: Path) -> list[str]:
    """Nodes after the last Conv (final residual Add, ReLU, pooling, flatten): kept in float.

    Quantizing them would round the output features themselves to 8 bits (at the add, the pool and
    the output): the features are what the check and every user compares.
    """
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    last = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=len(nodes) - 1)
    return [n.name for n in nodes[last + 1:]]


def int8_onnx_path(model: torch.nn.Module, data: torch.Tensor | None = None) -> Path:
    """The model's int8 ONNX file (static QDQ, per-channel weights), quantized once and reused.

    `data`: uint8/float images to calibrate on (default: `CALIBRATION_IMAGES` images of the training
    domain, taken from the end of the train split so they are not the check's bank).
    """
    d = model_cache_dir(model)
    path = d / "model.int8.onnx"
    if path.exists():
        if _read_json(d / "onnx.json").get("int8", {}).get("recipe") == INT8_RECIPE:
            return path
        log.info("re-quantizing %s: its int8 file was made with an older recipe", _spec(model).name)
        path.unlink()
    quant = require("onnxruntime.quantization", "onnx", "int8 quantization")
    fp32 = onnx_path(model)
    if data is None:
        data, _, what = domain_images(model, "train", CALIBRATION_IMAGES, from_end=True)
    else:
        what = f"{len(data)} user images"
    inputs = model.preprocess(data[:, None] if data.dim() == 3 else data).numpy()

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"images": inputs[i: i + 16]} for i in range(0, len(inputs), 16)])

        def get_next(self):
            return next(self.batches, None)

    prep = d / "model.prep.onnx"
    tmp = d / ".model.int8.onnx.tmp"
    try:
        # Shape inference + graph optimisation first, as onnxruntime's quantization docs advise.
        quant.quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
        source = prep
    except Exception as e:  # pre-processing is an optimisation; quantize the plain file if it fails
        log.debug("quant_pre_process failed (%s); quantizing %s directly", e, fp32)
        source = fp32
    # u8 activations x s8 weights is the fast pair of x86 kernels; without VNNI their 16-bit
    # intermediate sums can saturate, so weights are kept to 7 bits there (reduce_range).
    vnni = _cpu_has_vnni()
    tail = _tail_after_last_conv(source)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))  # the quantizer logs a line per duplicated bias at INFO
    try:
        quant.quantize_static(str(source), str(tmp), Reader(), quant_format=quant.QuantFormat.QDQ, per_channel=True,
                              reduce_range=not vnni, activation_type=quant.QuantType.QUInt8,
                              weight_type=quant.QuantType.QInt8, calibrate_method=quant.CalibrationMethod.MinMax,
                              nodes_to_exclude=tail,
                              extra_options={"CalibMovingAverage": True,
                                             "CalibMovingAverageConstant": MOVING_AVERAGE_CONSTANT})
        os.replace(tmp, path)
    finally:
        root.setLevel(level)
        tmp.unlink(missing_ok=True)
        prep.unlink(missing_ok=True)
        for extra in d.glob("*.onnx-*"):  # calibration scratch files some onnxruntime versions leave
            extra.unlink(missing_ok=True)
    info = _read_json(d / "onnx.json")
    info["int8"] = {"recipe": INT8_RECIPE, "format": "QDQ", "weights": "int8 per-channel",
                    "activations": f"uint8 per-tensor (min/max, moving average {MOVING_AVERAGE_CONSTANT} over "
                                   f"16-image batches)",
                    "float_tail": tail,
                    "reduce_range": not vnni, "calibration": f"{len(inputs)} images, {what}"}
    _write_json(d / "onnx.json", info)
    return path


# ------------------------------------------------------------------------------------------ checks
def _check_sizes(model: torch.nn.Module) -> tuple[int, int]:
    # 2000 queries: one query is 0.05 point, so the +-0.5 rule is ten queries' worth (300 queries, 0.33
    # point each, could not tell quantization error from the luck of a few borderline images). Big
    # inputs (224 px ResNet-50: ~26 img/s fp32 on 2 cores) get a smaller bank: a few minutes, once.
    return (5000, 2000) if _spec(model).input_size <= 64 else (3000, 2000)


def _neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    from zoo.eval import knn_search

    return torch.from_numpy(knn_search(bank, queries, k, metric="cosine")[1])


def _reference(model, runner_fp32, bank_x, query_x, key: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 features of the check images, cached on disk beside the model (the reference is reused)."""
    path = model_cache_dir(model) / f"reference-fp32-{key}.npy"
    if path.exists():
        both = torch.from_numpy(np.load(path))
        if both.shape[0] == len(bank_x) + len(query_x):
            return both[: len(bank_x)], both[len(bank_x):]
    bank = _features(runner_fp32, model, bank_x, batch_size)
    queries = _features(runner_fp32, model, query_x, batch_size)
    from zoo.embed import _atomic_save_npy

    _atomic_save_npy(path, torch.cat([bank, queries]).numpy())
    return bank, queries


def check_precision(model: torch.nn.Module, precision: str, force: bool = False,
                    sizes: tuple[int, int] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Measure `precision` ("bf16" or "int8") against fp32 on real images; stored in `precision.json`."""
    from zoo.embed import make_runner
    from zoo.eval import knn_accuracy

    if precision not in ("bf16", "int8"):
        raise ValueError(f"precision must be 'bf16' or 'int8', got {precision!r}")
    d = model_cache_dir(model)
    report_path = d / "precision.json"
    report = _read_json(report_path)
    entry = report.get(precision)
    # A stored check is reused whatever its size, unless sizes= asks for another one (or force=), or it
    # was made under an older rule or, for int8, on a file of an older recipe.
    current = (entry and entry.get("check_version") == CHECK_VERSION
               and (precision != "int8" or entry.get("int8_recipe") == INT8_RECIPE))
    if current and not force and (sizes is None or (entry.get("n_bank"), entry.get("n_queries")) == tuple(sizes)):
        return entry
    n_bank, n_queries = sizes or _check_sizes(model)
    spec = _spec(model)
    bank_x, bank_y, what = domain_images(model, "train", n_bank)
    query_x, query_y, _ = domain_images(model, "test", n_queries)
    what = what.replace(" train", " train (bank) + test (queries)", 1)
    bs = 256 if spec.input_size <= 64 else 32
    if verbose:
        print(f"checking {precision} for {spec.name} against fp32 on {n_bank} + {n_queries} images "
              f"({what}); once, then cached in {report_path}", file=sys.stderr)
    ref_bank, ref_q = _reference(model, make_runner(model, "torch", "fp32"), bank_x, query_x,
                                 f"{n_bank}-{n_queries}", bs)
    low = make_runner(model, "onnxruntime" if precision == "int8" else "torch", precision, check=False)
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
    report = _read_json(report_path)  # re-read: another precision may have been checked meanwhile
    report[precision] = entry
    report["model"] = spec.name
    _write_json(report_path, report)
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
    name = _spec(model).name
    if not entry["accepted"]:
        raise PrecisionRejectedError(f"{precision} is refused for {name}: {describe(entry)}; use precision='fp32'")
    key = (name, weights_fingerprint(model), precision)
    if key not in _announced:  # the numbers, once per process
        _announced.add(key)
        print(f"{precision} accepted for {name}: {describe(entry)}", file=sys.stderr)
    return entry
