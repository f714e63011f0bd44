"""Per-model artefacts in the user cache: the ONNX file, its int8 quantization, and cached JSON records.

Everything lives in `~/.cache/ssl-zoo/<name>/<weights-fingerprint>/` (`$SSL_ZOO_CACHE` or
`$XDG_CACHE_HOME/ssl-zoo` move the root). The fingerprint is a sha256 of the weights, so an untrained
model, a fine-tuned one and the published one never share files:

- `model.onnx` (exported once with `zoo.onnx.export_onnx`, parity-checked against PyTorch) + `onnx.json`;
- `model.int8.onnx`: onnxruntime static quantization, QDQ format, int8 per-channel weights, uint8
  activations calibrated on a few hundred real images of the model's training domain (min/max with a
  moving average over calibration batches); `onnx.json` records the recipe, and a file made with an
  older recipe is made again;
- `precision.json` and the fp32 reference features of the low-precision checks (`zoo.precision`).

Fashion-MNIST is on every machine (`dataset-fashion-mnist`): fmnist models are calibrated on it; a
model of another domain uses it as a stand-in unless `data=` is given, and `onnx.json` says so.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError, require
from zoo.fsutil import atomic_write_json

log = logging.getLogger("zoo")

CALIBRATION_IMAGES = 600
# Activation ranges: per-batch min/max averaged over the 16-image calibration batches (onnxruntime's
# CalibMovingAverage) rather than the extremes of all images. Measured on the ResNet-50 at 224 px
# (3000 bank / 2000 queries, against fp32): global min/max on 300 images k-NN -0.55, recall@10 0.876
# (refused); moving average 0.01 on 300 images -0.30, 0.902; on 600 images +0.20, 0.924 (mean cosine to
# fp32 0.99885 -> 0.99966). Percentile/entropy calibration keep whole activation tensors and run out of
# memory at 224 px on this machine.
MOVING_AVERAGE_CONSTANT = 0.01
INT8_RECIPE = f"qdq-s8w-perchannel-u8a-minmax-ma{MOVING_AVERAGE_CONSTANT}-{CALIBRATION_IMAGES}img"


def params_version(model: torch.nn.Module) -> tuple:
    """A cheap staleness key of the weights: in-place updates (optimizer steps, load_state_dict) bump
    tensor versions. Keys the cached fingerprint here and the frozen TorchScript graph of `zoo.runners`."""
    return tuple(t._version for t in model.state_dict().values())


def cache_root() -> Path:
    """`$SSL_ZOO_CACHE`, else `$XDG_CACHE_HOME/ssl-zoo`, else `~/.cache/ssl-zoo`."""
    env = os.environ.get("SSL_ZOO_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ssl-zoo"


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's tensors (names, dtypes, shapes, values); cached until the weights change."""
    version = params_version(model)
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


def model_spec(model: torch.nn.Module) -> Any:
    """The `ModelSpec` a `zoo.load` model carries (name, input size, domain); the cache is keyed by it."""
    spec = getattr(model, "spec", None)
    if spec is None:
        raise ZooError("ONNX and low-precision backends need a model from zoo.load (it carries .spec: name, "
                       "input size, training domain)")
    return spec


def model_cache_dir(model: torch.nn.Module) -> Path:
    """`<cache>/<name>/<first 12 hex of the weights' sha256>/`, created."""
    # The input size is part of the key: an ONNX graph is exported for one size.
    spec = model_spec(model)
    d = cache_root() / spec.name / f"{weights_fingerprint(model)[:12]}-{spec.input_size}px"
    d.mkdir(parents=True, exist_ok=True)
    return d


def read_json(path: Path) -> dict:
    """A cached JSON record, or {} when it is missing or unreadable (then it is made again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def domain_images(model: torch.nn.Module, split: str, n: int, from_end: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """`n` uint8 images `[n, 28, 28]`, labels, and a description of the data, for checks and calibration.

    Fashion-MNIST for every model: the training domain of fmnist models, a stand-in (said in the
    description) for the others, whose datasets are not on the machine.
    """
    from zoo.datasets import fashion_mnist_split

    data = fashion_mnist_split(split, n, from_end=from_end)
    spec = model_spec(model)
    what = data.name
    if spec.tag != "fmnist":
        what += f" (stand-in: no {spec.dataset} images on this machine)"
    return data.images, data.labels, what


# ------------------------------------------------------------------------------------------ ONNX files
def onnx_path(model: torch.nn.Module) -> Path:
    """The model's fp32 ONNX file in the cache: exported and parity-checked on real images the first time."""
    from zoo.onnx import check_onnx_parity, export_onnx

    d = model_cache_dir(model)
    path = d / "model.onnx"
    if path.exists():
        return path
    spec = model_spec(model)
    cpu = model if all(p.device.type == "cpu" for p in model.parameters()) else copy.deepcopy(model).cpu()
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
    atomic_write_json(d / "onnx.json", {"model": spec.name, "parity_max_abs_diff": diff, "atol": atol,
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
        if read_json(d / "onnx.json").get("int8", {}).get("recipe") == INT8_RECIPE:
            return path
        log.info("re-quantizing %s: its int8 file was made with an older recipe", model_spec(model).name)
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
    info = read_json(d / "onnx.json")
    info["int8"] = {"recipe": INT8_RECIPE, "format": "QDQ", "weights": "int8 per-channel",
                    "activations": f"uint8 per-tensor (min/max, moving average {MOVING_AVERAGE_CONSTANT} over "
                                   f"16-image batches)",
                    "float_tail": tail,
                    "reduce_range": not vnni, "calibration": f"{len(inputs)} images, {what}"}
    atomic_write_json(d / "onnx.json", info)
    return path
