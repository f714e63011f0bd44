"""Runners: a model as a callable `[B, 3, S, S] preprocessed -> [B, D] float32`, per backend and precision.

- `TorchRunner`: channels_last + `torch.inference_mode`; on CPU in fp32 a frozen TorchScript graph
  (`torch.jit.freeze` + `optimize_for_inference`: conv+BN folded, oneDNN kernels), eager if tracing
  fails; bf16 under torch autocast.
- `OrtRunner`: an onnxruntime session over the model's ONNX file (fp32 or int8, from `zoo.artifacts`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable

import torch

from zoo.artifacts import int8_onnx_path, onnx_path, params_version
from zoo.errors import EmbedError

log = logging.getLogger("zoo")

BACKENDS = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def default_batch_size(model: torch.nn.Module) -> int:
    """Default batch: 256 for models of <= 64 px input (or without a spec), else 32."""
    spec = getattr(model, "spec", None)
    return 256 if spec is None or spec.input_size <= 64 else 32


class TorchRunner:
    """The model in torch: channels_last + inference_mode; on CPU fp32, a frozen oneDNN TorchScript graph."""

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32", jit: bool = True):
        self.model, self.device, self.precision = model, device, precision
        self.graph = None
        if precision == "fp32" and jit and device.type == "cpu":
            self.graph = _frozen_graph(model)
        if self.graph is None:
            # channels_last is what oneDNN/cuDNN convolutions run fastest on; the conversion is in place
            # and changes no result.
            model.to(memory_format=torch.channels_last)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            if self.graph is not None:
                return self.graph(x.contiguous()).float()
            x = x.contiguous(memory_format=torch.channels_last)
            if self.precision == "bf16":
                with torch.autocast(self.device.type, dtype=torch.bfloat16):
                    return self.model(x).float()
            return self.model(x).float()


def _frozen_graph(model: torch.nn.Module) -> Any:
    """Trace + freeze + optimize_for_inference, cached on the model until its weights change; None if it fails."""
    spec = getattr(model, "spec", None)
    size = int(spec.input_size) if spec is not None else None
    if size is None or model.training:
        return None
    key = (size, params_version(model))
    cached = getattr(model, "_zoo_frozen", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and TorchScript deprecation notices
            traced = torch.jit.trace(model, torch.zeros(2, 3, size, size))
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as e:  # an exotic module: eager is always correct
        log.debug("TorchScript freeze failed (%s); running eager", e)
        return None
    object.__setattr__(model, "_zoo_frozen", (key, graph))  # not a submodule: keep it out of state_dict
    return graph


class OrtRunner:
    """An onnxruntime session over an ssl-zoo ONNX file (`images` -> `features`)."""

    def __init__(self, session: Any):
        self.session = session

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(["features"], {"images": x.detach().cpu().float().contiguous().numpy()})[0]
        return torch.from_numpy(out).float()


def run_chunks(run: Callable[[torch.Tensor], torch.Tensor], preprocess: Callable[[torch.Tensor], torch.Tensor],
               images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Unnormalised float32 features of an in-memory uint8 image tensor, `batch_size` images per call of `run`.

    `zoo.embed.embed` is the loop for users (any input, unreadable files, workers, ids). This is the bare
    loop for callers that must run their own forward on images already in memory: the precision checks
    (fp32 vs a low-precision runner) and the trainer's k-NN monitor (the training backbone, in the
    recipe's autocast, on its device; the recipes' monitor curves were measured with exactly this).
    Features stay where `run` put them.
    """
    return torch.cat([run(preprocess(chunk)).float() for chunk in images.split(batch_size)])


def check_backend(backend: str, precision: str) -> None:
    """Refuse an unknown backend / precision, or a pair that cannot run, with the fix in one line."""
    if backend not in BACKENDS:
        raise EmbedError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise EmbedError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and backend != "torch":
        raise EmbedError("precision='bf16' runs on backend='torch' (autocast); onnxruntime runs fp32 or int8")


def make_runner(model: torch.nn.Module, backend: str = "torch", precision: str = "fp32",
                device: str | torch.device | None = None, jit: bool = True) -> Callable:
    """A callable `[B, 3, S, S] preprocessed -> [B, D] float32` for a backend/precision.

    It does not check the quality of bf16 / int8: callers that serve users go through
    `zoo.embed.checked_runner`, which requires `zoo.precision.require_precision` first (the check
    itself builds its low-precision runner here). int8 always runs on onnxruntime.
    """
    check_backend(backend, precision)
    dev = torch.device(device) if device is not None else model_device(model)
    if precision == "int8" or backend == "onnxruntime":
        from zoo.onnx import onnx_session

        path = int8_onnx_path(model) if precision == "int8" else onnx_path(model)
        return OrtRunner(onnx_session(path, None if dev.type == "cpu" and device is None else dev))
    if dev != model_device(model):
        model.to(dev)
    return TorchRunner(model, dev, precision, jit=jit)
