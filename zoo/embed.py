"""`zoo.embed`: images in, float32 features out, whatever the images are and however many.

    emb = zoo.embed(model, "photos/")           # a folder (recursive), paths, PIL images, a tensor, a Dataset
    emb.features                                # float32 [N, D], L2-normalised unless normalize=False
    emb.ids                                     # paths (or indices) in the same order
    emb.failed                                  # [(path or index, reason)] for inputs that could not be read

Decoding and preprocessing run in DataLoader workers, one whole batch per worker call (`zoo.sources`,
`zoo.images`); the model runs in the main process under `torch.inference_mode` (`zoo.runners`).
Backends and precisions:

- `backend="torch"`, `precision="fp32"`: channels_last, and on CPU a frozen TorchScript graph
  (`torch.jit.freeze` + `optimize_for_inference`: conv+BN folded, oneDNN kernels); eager if tracing fails.
- `precision="bf16"`: torch autocast; accepted only after its quality check (`zoo.precision`).
- `backend="onnxruntime"`: the model's ONNX file, exported once into the user cache with a parity check
  (`zoo.artifacts`).
- `precision="int8"`: onnxruntime static QDQ quantization, always on onnxruntime, quality-checked.

`layer="layer3"`, `pool="gem"` take features from any stage (`stem`, `layer1`-`layer4`) pooled by
`avg`, `gem` (p = 3), `max` or `none` (the map flattened; `Embeddings.map_shape` records its
`(C, h, w)`); see `zoo.features`. The default (`layer4`, `avg`) is the model itself. Other stages
and pools run on `backend="torch"` in fp32 (the ONNX files and precision checks are the pooled model's).

`zoo.shards.embed_to_dir` writes the same features in shards that survive a kill (resume at the last
finished shard) and splits the work over `torchrun` ranks; it batches and runs through this module.
"""

from __future__ import annotations

import logging
import os
from numbers import Integral
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from zoo.errors import EmbedError
from zoo.images import DEFAULT_MAX_PIXELS
from zoo.precision import require_precision
from zoo.runners import check_backend, default_batch_size, make_runner
from zoo.sources import Source, TensorSource, make_source

log = logging.getLogger("zoo")


@dataclass
class Embeddings:
    """Features of the inputs that could be read, their ids, and the inputs that could not.

    `features`: float32 `[N, D]` CPU tensor, row i belongs to `ids[i]`. `ids`: the path (as given or
    found in the folder) or the position of the input. `failed`: `(id, reason)` pairs. `labels`:
    `[N]` int64 when the inputs carried labels (a Dataset yielding `(image, label)`), else None.
    `map_shape`: `(C, h, w)` of each row before flattening when embedded with `pool="none"`, else None.
    """

    features: torch.Tensor
    ids: list[Any]
    failed: list[tuple[Any, str]] = field(default_factory=list)
    labels: torch.Tensor | None = None
    map_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"Embeddings(features={tuple(self.features.shape)}, ids={len(self.ids)}, failed={len(self.failed)}"
                f"{'' if self.labels is None else ', labels'})")


# --------------------------------------------------------------------------------------------- batching
def prepare(model: torch.nn.Module, inputs: Any, layer: str | None, pool: str, backend: str, precision: str,
            preprocess: Callable | None, max_pixels: int, batch_size: int | None
            ) -> tuple[torch.nn.Module, Source, int]:
    """(model for `layer` / `pool`, the inputs' source, batch size): what `embed` and `embed_to_dir` run."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                   or batch_size < 1):
        raise EmbedError(f"batch_size must be a positive int (or None for the default), got {batch_size!r}")
    model = _stage_model(model, layer, pool, backend, precision)
    pre = _preprocess_of(model, preprocess)
    source = make_source(inputs, pre, max_pixels)
    return model, source, int(batch_size or default_batch_size(model))


def _preprocess_of(model: torch.nn.Module, preprocess: Callable | None) -> Callable:
    pre = preprocess or getattr(model, "preprocess", None)
    if pre is None:
        raise EmbedError("the model has no .preprocess (load it with zoo.load) and no preprocess= was given")
    return pre


def _stage_model(model: torch.nn.Module, layer: str | None, pool: str, backend: str, precision: str
                 ) -> torch.nn.Module:
    """The model for (layer, pool): itself for the default, else a `zoo.features.StagePool` (torch, fp32)."""
    from zoo.features import stage_model

    try:
        staged = stage_model(model, layer, pool)
    except ValueError as e:
        raise EmbedError(str(e)) from None
    if staged is not model and (backend != "torch" or precision != "fp32"):
        raise EmbedError(f"layer={layer!r} / pool={pool!r} run on backend='torch' in fp32; the onnxruntime "
                         f"backend and bf16/int8 precisions are checked for the pooled model (layer4, avg) only")
    return staged


def checked_runner(model: torch.nn.Module, backend: str, precision: str,
                   device: str | torch.device | None) -> Callable:
    """`zoo.runners.make_runner`, after bf16 / int8 passed their quality check (`require_precision`, cached)."""
    check_backend(backend, precision)  # a wrong name fails before any check is measured
    if precision != "fp32":
        require_precision(model, precision)
    return make_runner(model, backend, precision, device)


def default_workers(source: Source, n_batches: int) -> int:
    """DataLoader workers: 0 for tensors and single batches, else min(4, cores - 1)."""
    # In-memory tensors are preprocessed with one vectorised call per batch: a worker would only add IPC.
    if isinstance(source, TensorSource) or n_batches < 2:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _loader(source: Source, batches: list[list[int]], num_workers: int, pin: bool = False
            ) -> Iterator[dict[str, Any]]:
    if num_workers <= 0:
        for b in batches:
            yield source.batch(b)
        return
    # batch_size=None + a sampler of index lists: each worker call decodes and preprocesses a whole batch;
    # pinned batches (for a CUDA model) copy to the device without blocking the host.
    loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=batches, num_workers=num_workers,
                                         prefetch_factor=2, persistent_workers=False, pin_memory=pin)
    yield from loader


def runner_device(runner: Callable) -> torch.device:
    """Where a runner computes: a TorchRunner's device, else the host (onnxruntime takes numpy)."""
    return getattr(runner, "device", None) or torch.device("cpu")


def run_batches(source: Source, batches: list[list[int]], runner: Callable, normalize: bool, num_workers: int,
                progress: bool, desc: str = "embed") -> Iterator[tuple[list[int], torch.Tensor, list, torch.Tensor]]:
    """(kept indices, features, failed (index, reason), labels) per batch, in batch order."""
    from tqdm.auto import tqdm

    total = sum(len(b) for b in batches)
    device = runner_device(runner)
    on_accelerator = device.type == "cuda"
    pending: tuple | None = None  # the previous batch, its features still copying to the host
    with tqdm(total=total, unit="img", desc=desc, disable=not progress or total == 0, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for out in _loader(source, batches, num_workers, pin=on_accelerator):
            kept = out["idx"]
            f, done = torch.empty(0), None
            if kept:
                f = runner(out["x"]).float()
                if normalize:
                    f = F.normalize(f, dim=1)
                if on_accelerator:  # copy back without waiting; wait for it one batch later, not now
                    f = f.to("cpu", non_blocking=True)
                    done = torch.cuda.Event()
                    done.record()
                else:
                    f = f.cpu()  # a no-op for host tensors; explicit so no device tensor ever leaves here
            if pending is not None:
                yield _landed(pending, bar)
            pending = (kept, f, out["failed"], out["labels"], done)
        if pending is not None:
            yield _landed(pending, bar)


def _landed(pending: tuple, bar: Any) -> tuple[list[int], torch.Tensor, list, torch.Tensor]:
    kept, f, failed, labels, done = pending
    if done is not None:
        done.synchronize()
    bar.update(len(kept) + len(failed))
    return kept, f, failed, labels


def embed(model: torch.nn.Module, inputs: Any, batch_size: int | None = None, device: str | torch.device | None = None,
          backend: str = "torch", precision: str = "fp32", normalize: bool = True, progress: bool = True,
          num_workers: int | None = None, preprocess: Callable | None = None,
          max_pixels: int = DEFAULT_MAX_PIXELS, layer: str | None = None, pool: str = "avg") -> Embeddings:
    """Embed images with a `zoo.load` model; see the module docstring for inputs, backends and precisions.

    Inputs: a tensor batch (`[N, H, W]` grayscale or `[N, C, H, W]`: uint8, other integer dtypes read as
    0-255 pixel values, or float in [0, 1]; a float batch with values above 1, negative values, NaN,
    bool and complex tensors are refused with one line, see `zoo.sources.checked_pixels`), a list
    of PIL images or paths, a folder (recursive, by image extension), or a map-style torch Dataset
    (yielding an image or `(image, label)`). Unreadable inputs are skipped and reported in `.failed`.
    `batch_size` defaults to 256 for models of <= 64 px input, else 32. `num_workers` defaults to
    0 for tensors (preprocessed by one vectorised call per batch) and min(4, cores - 1) otherwise.
    `layer` / `pool`: features of another stage or pooling (module docstring); default layer4 + avg.
    """
    model, source, bs = prepare(model, inputs, layer, pool, backend, precision, preprocess, max_pixels, batch_size)
    if bs < 1:
        raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
    runner = checked_runner(model, backend, precision, device)
    batches = [list(range(s, min(s + bs, len(source)))) for s in range(0, len(source), bs)]
    workers = default_workers(source, len(batches)) if num_workers is None else int(num_workers)
    source.device = runner_device(runner) if workers == 0 else None  # worker processes stay off the GPU
    feats, ids, failed, labels = [], [], [], []
    for kept, f, bad, lab in run_batches(source, batches, runner, normalize, workers, progress):
        if kept:
            feats.append(f)
            ids.extend(source.id(i) for i in kept)
            labels.append(lab)
        failed.extend((source.id(i), reason) for i, reason in bad)
    if failed:
        log.info("skipped %d unreadable input(s); Embeddings.failed lists each with its reason", len(failed))
    if feats:
        features = torch.cat(feats)
    else:
        features = torch.empty(0, getattr(model, "feature_dim", 0), dtype=torch.float32)
    lab = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)
    has_labels = source.labelled and lab.numel() > 0 and bool((lab >= 0).all())
    shape = getattr(model, "map_shape", None) if getattr(model, "pool", None) == "none" else None
    return Embeddings(features, ids, failed, lab if has_labels else None, shape)


class _CallableModule(type(sys)):
    """`zoo.embed` is both this module and the function: whichever `zoo.embed` resolves to, calling it embeds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Embeddings:
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
