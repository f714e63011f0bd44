"""ONNX export of a backbone, an onnxruntime session for it, and a parity check against PyTorch.

The exported graph has one input and one output, the same for every arch:

- `images`: float32 `[N, 3, S, S]`, already preprocessed (resize, centre crop, scale to [0, 1], grayscale
  repeated to 3 channels, normalised with the model's mean/std: what `model.preprocess` returns);
- `features`: float32 `[N, D]`, the pooled backbone features (`model(images)`).

The batch axis `N` is dynamic; `S` is fixed at export time. onnx and onnxruntime are optional
dependencies (`pip install 'ssl-zoo[onnx]'`), imported only when these functions run.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import ZooError, require

log = logging.getLogger("zoo")

INPUT_NAME = "images"
OUTPUT_NAME = "features"
MIN_OPSET = 17


class OnnxParityError(ZooError, ValueError):
    """The ONNX graph and the PyTorch module disagree beyond the tolerance."""


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: int, opset: int = 17,
                weights_dtype: str = "float32") -> Path:
    """Write `model` as an ONNX graph (`images [N,3,S,S]` -> `features [N,D]`, dynamic N) to `path`.

    `weights_dtype="float16"` stores every weight in half precision behind a `Cast` to float32 (half the
    file; onnxruntime folds the casts and fuses BatchNorm at session start, so it runs as fast as fp32).
    Use it for a model whose weights are already fp16-rounded (an fp16 safetensors file): BatchNorm is then
    kept unfolded in the graph, so every stored value is exact and the outputs match PyTorch's.
    The file appears only once it is complete and passes `onnx.checker` (temp file + rename).
    """
    if weights_dtype not in ("float32", "float16"):
        raise ValueError(f"weights_dtype must be 'float32' or 'float16', got {weights_dtype!r}")
    require("onnx", "onnx", "ONNX export")
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for ssl-zoo's ONNX files; pass opset >= {MIN_OPSET}")
    if int(input_size) < 8:
        raise ValueError(f"input_size must be the model's input side in pixels (e.g. spec.input_size), "
                         f"got {input_size}")
    meta = {"producer": "ssl-zoo", "input_layout": "NCHW", "input_size": str(input_size)}
    doc = (f"ssl-zoo backbone. Input '{INPUT_NAME}': float32 [N, 3, {input_size}, {input_size}], normalised. "
           f"Output '{OUTPUT_NAME}': float32 [N, D] pooled features.")
    return _write_checked_onnx(
        model, path, int(input_size), int(opset), [OUTPUT_NAME], {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        # Folding BatchNorm into the convolutions would make fp16-stored weights inexact.
        fold_constants=weights_dtype == "float32", fp16_weights=weights_dtype == "float16", doc=doc, meta=meta)


def _write_checked_onnx(model: nn.Module, path: str | os.PathLike, size: int, opset: int, output_names: list[str],
                        dynamic_axes: dict[str, dict[int, str]], fold_constants: bool, fp16_weights: bool, doc: str,
                        meta: dict[str, str]) -> Path:
    """Trace a CPU copy of `model` to `path` with its doc string and metadata (plus the spec's preprocessing),
    `onnx.checker`-clean; the file appears only once complete (temp file + rename)."""
    onnx = require("onnx", "onnx", "ONNX export")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Export a CPU copy in eval mode: BatchNorm must use its running stats, and the caller's module
    # (device, train/eval state) is left as it was.
    cpu_model = copy.deepcopy(model).float().cpu().eval()
    dummy = torch.zeros(2, 3, size, size)
    spec = getattr(model, "spec", None)
    if spec is not None:  # preprocessing constants for onnxruntime-only users
        meta = {**meta, "name": spec.name, "mean": ",".join(map(str, spec.mean)), "std": ",".join(map(str, spec.std)),
                "resize_size": str(spec.resize_size), "interpolation": spec.interpolation}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript-based exporter needs no onnxscript (not in the [onnx] extra) and traces
            # these plain ResNets exactly; its deprecation and tracer notices are expected here.
            warnings.simplefilter("ignore")
            torch.onnx.export(cpu_model, (dummy,), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=output_names, dynamic_axes=dynamic_axes,
                              do_constant_folding=fold_constants)
        proto = onnx.load(str(tmp))
        if fp16_weights:
            _store_initializers_fp16(proto)
        proto.doc_string = doc
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _store_initializers_fp16(proto: Any) -> None:
    """Replace each float32 initializer `w` by a float16 `w.fp16` and a `Cast(w.fp16) -> w` node."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    casts, kept = [], []
    for init in proto.graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        stored = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), f"{init.name}.fp16")
        kept.append(stored)
        casts.append(helper.make_node("Cast", [stored.name], [init.name], to=TensorProto.FLOAT,
                                      name=f"{init.name}.to_float32"))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    nodes = casts + list(proto.graph.node)  # the casts come first: graph nodes must be topologically sorted
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _cuda_available(ort: Any) -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def onnx_session(path: str | os.PathLike, device: str | torch.device | None = None) -> Any:
    """An onnxruntime `InferenceSession` for `path`: the CUDA provider when available, else the CPU.

    `device` is None or "cuda[:K]" (CUDA if this onnxruntime has it, else CPU with a warning for an
    explicit "cuda"), or "cpu".
    """
    ort = require("onnxruntime", "onnx", "the onnxruntime backend")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX file {path} does not exist; write it with `zoo export` or "
                                f"zoo.onnx.export_onnx(model, path, input_size)")
    try:
        dev = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be None, 'cpu' or 'cuda[:K]', got {str(device)!r}") from e
    if dev is None:
        use_cuda, index = _cuda_available(ort), 0
    elif dev.type == "cpu":
        use_cuda, index = False, 0
    elif dev.type == "cuda":
        use_cuda, index = _cuda_available(ort), dev.index or 0
        if not use_cuda:  # CPU still gives the right features: say how to get the GPU, don't fail
            log.warning("onnxruntime has no CUDA provider here: running %s on the CPU; install onnxruntime-gpu "
                        "(pip install 'ssl-zoo[gpu]') for device=%r", path.name, str(device))
    else:
        raise ValueError(f"device must be None, 'cpu' or 'cuda[:K]', got {str(device)!r}")
    providers: list[Any] = [("CUDAExecutionProvider", {"device_id": index})] if use_cuda else []
    providers.append("CPUExecutionProvider")
    return ort.InferenceSession(str(path), providers=providers)


@torch.no_grad()
def check_onnx_parity(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor, atol: float = 1e-4,
                      batch_size: int = 64) -> float:
    """Max |ONNX - PyTorch| over `inputs` (`[N,3,S,S]` float32); raises `OnnxParityError` above `atol`.

    Both sides run in fp32 on the CPU, so TF32 or GPU kernels cannot blur the comparison.
    """
    if inputs.dim() != 4 or inputs.shape[1] != 3:
        raise ValueError(f"inputs must be preprocessed images [N, 3, S, S], got shape {tuple(inputs.shape)}")
    session = onnx_session(path, device="cpu")
    return _max_diff(model, session, [OUTPUT_NAME], path, inputs, atol, batch_size,
                     "re-export it from this model with zoo.onnx.export_onnx")


def _max_diff(model: nn.Module, session: Any, names: list[str], path: str | os.PathLike, inputs: torch.Tensor,
              atol: float, batch_size: int, reexport: str) -> float:
    """Max |ONNX - PyTorch| over the outputs `names`, both in fp32 on the CPU (a CUDA model is copied there)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    reference = model if on_cpu else copy.deepcopy(model).cpu()
    was_training = reference.training
    reference.eval()
    worst = 0.0
    try:
        for chunk in inputs.float().cpu().split(batch_size):
            out = reference(chunk)
            expected = [t.float().numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]
            got = session.run(names, {INPUT_NAME: chunk.numpy()})
            for name, g, e in zip(names, got, expected):
                if g.shape != e.shape:
                    raise OnnxParityError(f"ONNX model {path} returns {name} of shape {g.shape}, PyTorch "
                                          f"{e.shape}; {reexport}")
                worst = max(worst, float(abs(g - e).max()) if g.size else 0.0)
    finally:
        reference.train(was_training)
    if not worst <= atol:  # also catches NaN
        raise OnnxParityError(f"ONNX model {path} differs from PyTorch by max |diff| {worst:.3g} > atol {atol:g} "
                              f"on {inputs.shape[0]} inputs; re-export it from these weights (opset >= {MIN_OPSET})")
    return worst


# ------------------------------------------------------------------------------------------ feature maps
def export_features_onnx(model: nn.Module, path: str | os.PathLike, input_size: int | None = None,
                         opset: int = 17) -> Path:
    """Write a `features_only` model (`zoo.load(name, features_only=True)`) as ONNX.

    Input `images` `[N, 3, H, W]` (normalised, as `model.preprocess` returns), one output per map named
    `feature_<stage index>` (`feature_1` ... `feature_4` for layer1-layer4) `[N, C_i, h_i, w_i]`; N, H and W
    are dynamic (traced at `input_size`, default the model's `spec.input_size`). The channels, reductions and
    output names are stored in the file's metadata. Temp file + rename, `onnx.checker` as `export_onnx`.
    """
    require("onnx", "onnx", "ONNX export")
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old for ssl-zoo's ONNX files; pass opset >= {MIN_OPSET}")
    names = getattr(model, "output_names", None)
    info = getattr(model, "feature_info", None)
    if names is None or info is None:
        raise ValueError("export_features_onnx takes a features_only model: zoo.load(name, features_only=True); "
                         "export the pooled model with export_onnx")
    spec = getattr(model, "spec", None)
    size = int(input_size if input_size is not None else (spec.input_size if spec is not None else 0))
    if size < 8:
        raise ValueError(f"input_size must be an input side in pixels (e.g. spec.input_size), got {input_size}")
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"},
            **{n: {0: "batch", 2: f"{n}_height", 3: f"{n}_width"} for n in names}}
    doc = (f"ssl-zoo feature maps. Input '{INPUT_NAME}': float32 [N, 3, H, W], normalised. Outputs "
           f"{', '.join(names)}: float32 [N, C, H/r, W/r] with channels {info.channels()} and reductions "
           f"{info.reduction()}.")
    meta = {"producer": "ssl-zoo", "input_layout": "NCHW", "input_size": str(size), "outputs": ",".join(names),
            "channels": ",".join(map(str, info.channels())), "reductions": ",".join(map(str, info.reduction()))}
    return _write_checked_onnx(model, path, size, int(opset), list(names), axes, fold_constants=True,
                               fp16_weights=False, doc=doc, meta=meta)


@torch.no_grad()
def check_features_onnx_parity(model: nn.Module, path: str | os.PathLike, inputs: torch.Tensor, atol: float = 1e-4,
                               batch_size: int = 64) -> float:
    """Max |ONNX - PyTorch| over every map of a features_only model; raises `OnnxParityError` above `atol`.

    The same check as `check_onnx_parity` (fp32, CPU, both sides), map by map and output name by name.
    """
    if inputs.dim() != 4 or inputs.shape[1] != 3:
        raise ValueError(f"inputs must be preprocessed images [N, 3, H, W], got shape {tuple(inputs.shape)}")
    session = onnx_session(path, device="cpu")
    names = list(model.output_names)
    got_names = [o.name for o in session.get_outputs()]
    if got_names != names:
        raise OnnxParityError(f"ONNX model {path} has outputs {got_names}, the model returns {names}; re-export it "
                              f"with zoo.onnx.export_features_onnx")
    return _max_diff(model, session, names, path, inputs, atol, batch_size,
                     "re-export it with zoo.onnx.export_features_onnx")
