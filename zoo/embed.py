"""`zoo.embed`: images in, float32 features out, whatever the images are and however many.

    emb = zoo.embed(model, "photos/")           # a folder (recursive), paths, PIL images, a tensor, a Dataset
    emb.features                                # float32 [N, D], L2-normalised unless normalize=False
    emb.ids                                     # paths (or indices) in the same order
    emb.failed                                  # [(path or index, reason)] for inputs that could not be read

Decoding and preprocessing run in DataLoader workers, one whole batch per worker call; the model
runs in the main process under `torch.inference_mode`. Backends and precisions:

- `backend="torch"`, `precision="fp32"`: channels_last, and on CPU a frozen TorchScript graph
  (`torch.jit.freeze` + `optimize_for_inference`: conv+BN folded, oneDNN kernels); eager if tracing fails.
- `precision="bf16"`: torch autocast; accepted only after its quality check (`zoo.quantize`).
- `backend="onnxruntime"`: the model's ONNX file, exported once into the user cache with a parity check.
- `precision="int8"`: onnxruntime static QDQ quantization, always on onnxruntime, quality-checked.

`layer="layer3"`, `pool="gem"` take features from any stage (`stem`, `layer1`-`layer4`) pooled by
`avg`, `gem` (p = 3), `max` or `none` (the map flattened; `Embeddings.map_shape` records its
`(C, h, w)`); see `zoo.features`. The default (`layer4`, `avg`) is the model itself. Other stages
and pools run on `backend="torch"` in fp32 (the ONNX files and precision checks are the pooled model's).

`embed_to_dir` writes the same features in shards that survive a kill (resume at the last finished
shard) and splits the work over `torchrun` ranks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from zoo.fsutil import atomic_write_bytes
from zoo.errors import ZooError

log = logging.getLogger("zoo")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".pnm", ".jfif"})
# PIL's own guard (89.5 Mpixels): past it a decoder may allocate gigabytes for one file.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)
BACKENDS = ("torch", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "int8")


class EmbedError(ZooError, ValueError):
    """Bad arguments to `embed` / `embed_to_dir` (one line, names the fix)."""


class UnreadableImage(Exception):
    """An input that cannot become an image; the message is the reason reported in `Embeddings.failed`."""


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


# --------------------------------------------------------------------------------------------- decoding
def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit 'L' by scaling (PIL's convert('L') would clip at 255)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a  # [0, 1] floats, else already 0-255
    else:
        a = a.astype(np.float64) / 257.0  # 16-bit range (0..65535) to 0..255; 'I' PNGs hold 16-bit values
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8))


def to_model_image(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as 8-bit 'L' or 'RGB', which `model.preprocess` turns into the model's 3 channels.

    Transparency (RGBA, LA, palette with a transparent colour) is composited over `background`
    (white, as a viewer shows it) instead of dropped: the colour stored under alpha 0 is arbitrary.
    """
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return _to_8bit_gray(im)
    if mode == "1":
        return im.convert("L")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB")  # P, CMYK (JPEG inverts are handled by PIL), YCbCr, LAB, HSV, I;16 RGB...


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file to 8-bit 'L' or 'RGB', upright (EXIF orientation applied).

    Raises `UnreadableImage` with a one-line reason for empty files, non-images, truncated or corrupt
    data, and images over `max_pixels` (checked from the header, before any pixel is decoded).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
    except OSError as e:
        raise UnreadableImage(f"cannot open: {e.strerror or e}") from None
    with warnings.catch_warnings():
        # Our own pixel check below decides; PIL's warning between 1x and 2x its limit would only be noise.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise UnreadableImage(f"{w}x{h} image ({w * h / 1e6:.0f} Mpixels) is over the decompression-bomb "
                                          f"limit of {max_pixels / 1e6:.0f} Mpixels (raise max_pixels= to read it)")
                im.load()
                return to_model_image(ImageOps.exif_transpose(im))
        except UnreadableImage:
            raise
        except Image.DecompressionBombError as e:
            raise UnreadableImage(f"decompression-bomb guard: {e}") from None
        except UnidentifiedImageError:
            raise UnreadableImage("not an image file (no known image format)") from None
        except MemoryError:
            raise UnreadableImage("out of memory while decoding") from None
        except Exception as e:  # truncated / corrupt streams: OSError, SyntaxError, ValueError, zlib errors...
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UnreadableImage(f"corrupt or truncated image data ({type(e).__name__}: {reason})") from None


def list_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder`, recursively, by extension (case-insensitive), in sorted path order."""
    root = Path(folder)
    found = [str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found)


# --------------------------------------------------------------------------------------------- sources
class _Source:
    """Inputs addressable by position; `batch(indices)` runs in a DataLoader worker (decode + preprocess)."""

    labelled = False

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]):
        self.preprocess = preprocess

    def __len__(self) -> int:
        raise NotImplementedError

    def id(self, i: int) -> Any:
        return i

    def item(self, i: int) -> tuple[Any, int | None]:
        """(PIL image or image tensor, label or None); raises UnreadableImage."""
        raise NotImplementedError

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        xs, kept, labels, failed = [], [], [], []
        for i in indices:
            try:
                image, label = self.item(i)
                x = self.preprocess(image)
                if not torch.isfinite(x).all():
                    raise UnreadableImage("image has NaN or inf values")
            except UnreadableImage as e:
                failed.append((i, str(e)))
                continue
            except Exception as e:  # one bad input must never take the whole run down
                failed.append((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")))
                continue
            xs.append(x)
            kept.append(i)
            labels.append(-1 if label is None else int(label))
        x = torch.stack(xs) if xs else torch.empty(0)
        return {"x": x, "idx": kept, "failed": failed, "labels": torch.tensor(labels, dtype=torch.int64)}

    def __getitem__(self, indices: Sequence[int]) -> dict[str, Any]:
        return self.batch(indices)

    def fingerprint(self) -> str:
        """Identifies the input list, so a resumed run can tell it is embedding the same corpus."""
        return f"{type(self).__name__}:{len(self)}"


class _TensorSource(_Source):
    """A batch tensor `[N, H, W]` (grayscale) or `[N, C, H, W]`, uint8 or float in [0, 1]."""

    def __init__(self, tensor: torch.Tensor, preprocess):
        super().__init__(preprocess)
        if tensor.dim() == 3:
            tensor = tensor[:, None]
        if tensor.dim() != 4:
            raise EmbedError(f"a tensor input must be a batch [N, H, W] or [N, C, H, W], got shape "
                             f"{tuple(tensor.shape)}; add a batch dim with x[None]")
        self.tensor = tensor

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = list(indices)
        x = self.preprocess(self.tensor[idx])  # one vectorised call per batch
        ok = torch.isfinite(x.flatten(1)).all(1)
        kept = [i for i, good in zip(idx, ok.tolist()) if good]
        failed = [(i, "image has NaN or inf values") for i, good in zip(idx, ok.tolist()) if not good]
        return {"x": x[ok], "idx": kept, "failed": failed, "labels": torch.full((len(kept),), -1, dtype=torch.int64)}

    def fingerprint(self) -> str:
        t = self.tensor
        sample = t[:: max(1, len(t) // 64)].contiguous()
        return f"tensor:{tuple(t.shape)}:{t.dtype}:{hashlib.sha256(sample.cpu().numpy().tobytes()).hexdigest()[:16]}"


class _ListSource(_Source):
    """A list of paths and/or PIL images (ids: the path as given, or the position of a PIL image)."""

    def __init__(self, items: Sequence[Any], preprocess, max_pixels: int):
        super().__init__(preprocess)
        self.items = list(items)
        self.max_pixels = max_pixels
        for j, it in enumerate(self.items):
            if not isinstance(it, (str, os.PathLike, Image.Image)):
                raise EmbedError(f"input {j} is a {type(it).__name__}; a list input must hold paths or PIL images")

    def __len__(self) -> int:
        return len(self.items)

    def id(self, i: int) -> Any:
        it = self.items[i]
        return i if isinstance(it, Image.Image) else str(it)

    def item(self, i: int) -> tuple[Any, None]:
        it = self.items[i]
        if isinstance(it, Image.Image):
            return to_model_image(it), None
        return read_image(it, self.max_pixels), None

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for i in range(len(self)):
            h.update(str(self.id(i)).encode() + b"\0")
        return f"list:{len(self)}:{h.hexdigest()[:16]}"


class _DatasetSource(_Source):
    """A map-style torch Dataset yielding an image or `(image, label, ...)`; images PIL, tensors or arrays.

    Ids are positions, or `dataset.ids[i]` when the dataset names its items with an `ids` sequence.
    """

    labelled = True

    def __init__(self, dataset, preprocess, max_pixels: int):
        super().__init__(preprocess)
        self.dataset, self.max_pixels = dataset, max_pixels
        names = getattr(dataset, "ids", None)
        self.names = list(names) if names is not None and len(names) == len(dataset) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def id(self, i: int) -> Any:
        return i if self.names is None else self.names[i]

    def fingerprint(self) -> str:
        if self.names is None:
            return super().fingerprint()
        h = hashlib.sha256("\0".join(map(str, self.names)).encode()).hexdigest()[:16]
        return f"dataset:{len(self)}:{h}"

    def item(self, i: int) -> tuple[Any, int | None]:
        sample = self.dataset[i]
        label = None
        if isinstance(sample, (tuple, list)):
            sample, rest = sample[0], sample[1:]
            if rest and (isinstance(rest[0], (int, np.integer)) or (torch.is_tensor(rest[0]) and rest[0].numel() == 1)):
                label = int(rest[0])
        if isinstance(sample, (str, os.PathLike)):
            sample = read_image(sample, self.max_pixels)
        elif isinstance(sample, Image.Image):
            sample = to_model_image(sample)
        elif isinstance(sample, np.ndarray):
            sample = torch.from_numpy(np.ascontiguousarray(sample))
            if sample.dim() == 3 and sample.shape[-1] in (1, 3) and sample.shape[0] not in (1, 3):
                sample = sample.permute(2, 0, 1)  # HWC arrays (PIL/numpy convention) to CHW
        return sample, label


def _make_source(inputs: Any, preprocess, max_pixels: int) -> _Source:
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if torch.is_tensor(inputs):
        return _TensorSource(inputs, preprocess)
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        if p.is_dir():
            return _ListSource(list_images(p), preprocess, max_pixels)
        if p.is_file():
            return _ListSource([str(inputs)], preprocess, max_pixels)
        raise EmbedError(f"{inputs} is neither a folder nor a file")
    if isinstance(inputs, Image.Image):
        return _ListSource([inputs], preprocess, max_pixels)
    if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):
        return _DatasetSource(inputs, preprocess, max_pixels)
    if isinstance(inputs, (list, tuple)):
        return _ListSource(inputs, preprocess, max_pixels)
    raise EmbedError(f"cannot embed a {type(inputs).__name__}: pass a tensor batch, a list of PIL images or paths, "
                     f"a folder, or a map-style torch Dataset")


# --------------------------------------------------------------------------------------------- runners
def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _params_version(model: torch.nn.Module) -> tuple:
    # In-place updates (optimizer steps, load_state_dict) bump tensor versions: a cheap staleness key.
    return tuple(t._version for t in model.state_dict().values())


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


def _frozen_graph(model: torch.nn.Module):
    """Trace + freeze + optimize_for_inference, cached on the model until its weights change; None if it fails."""
    spec = getattr(model, "spec", None)
    size = int(spec.input_size) if spec is not None else None
    if size is None or model.training:
        return None
    key = (size, _params_version(model))
    cached = getattr(model, "_zoo_frozen", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and TorchScript deprecation notices
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, torch.zeros(2, 3, size, size))))
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


def make_runner(model: torch.nn.Module, backend: str = "torch", precision: str = "fp32",
                device: str | torch.device | None = None, check: bool = True, jit: bool = True) -> Callable:
    """A callable `[B, 3, S, S] preprocessed -> [B, D] float32` for a backend/precision.

    bf16 and int8 pass their quality check first (`zoo.quantize.require_precision`, cached per model);
    int8 always runs on onnxruntime.
    """
    if backend not in BACKENDS:
        raise EmbedError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise EmbedError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" and backend != "torch":
        raise EmbedError("precision='bf16' runs on backend='torch' (autocast); onnxruntime runs fp32 or int8")
    dev = torch.device(device) if device is not None else _model_device(model)
    if precision != "fp32" and check:
        from zoo.quantize import require_precision

        require_precision(model, precision)
    if precision == "int8" or backend == "onnxruntime":
        from zoo.onnx import onnx_session
        from zoo.quantize import int8_onnx_path, onnx_path

        path = int8_onnx_path(model) if precision == "int8" else onnx_path(model)
        return OrtRunner(onnx_session(path, None if dev.type == "cpu" and device is None else dev))
    if dev != _model_device(model):
        model.to(dev)
    return TorchRunner(model, dev, precision, jit=jit)


# --------------------------------------------------------------------------------------------- embed
def _default_batch_size(model: torch.nn.Module) -> int:
    spec = getattr(model, "spec", None)
    return 256 if spec is None or spec.input_size <= 64 else 32


def _default_workers(source: _Source, n_batches: int) -> int:
    # In-memory tensors are preprocessed with one vectorised call per batch: a worker would only add IPC.
    if isinstance(source, _TensorSource) or n_batches < 2:
        return 0
    return max(1, min(4, (os.cpu_count() or 2) - 1))


def _loader(source: _Source, batches: list[list[int]], num_workers: int) -> Iterator[dict[str, Any]]:
    if num_workers <= 0:
        for b in batches:
            yield source.batch(b)
        return
    # batch_size=None + a sampler of index lists: each worker call decodes and preprocesses a whole batch.
    loader = torch.utils.data.DataLoader(source, batch_size=None, sampler=batches, num_workers=num_workers,
                                         prefetch_factor=2, persistent_workers=False)
    yield from loader


def _run_batches(source: _Source, batches: list[list[int]], runner: Callable, normalize: bool, num_workers: int,
                 progress: bool, desc: str = "embed") -> Iterator[tuple[list[int], torch.Tensor, list, torch.Tensor]]:
    """(kept indices, features, failed (index, reason), labels) per batch, in batch order."""
    from tqdm.auto import tqdm

    total = sum(len(b) for b in batches)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress or total == 0, file=sys.stderr,
              dynamic_ncols=True) as bar:
        for out in _loader(source, batches, num_workers):
            kept = out["idx"]
            if kept:
                f = runner(out["x"]).float().cpu()
                if normalize:
                    f = F.normalize(f, dim=1)
            else:
                f = torch.empty(0)
            bar.update(len(kept) + len(out["failed"]))
            yield kept, f, out["failed"], out["labels"]


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


def embed(model: torch.nn.Module, inputs: Any, batch_size: int | None = None, device: str | torch.device | None = None,
          backend: str = "torch", precision: str = "fp32", normalize: bool = True, progress: bool = True,
          num_workers: int | None = None, preprocess: Callable | None = None,
          max_pixels: int = DEFAULT_MAX_PIXELS, layer: str | None = None, pool: str = "avg") -> Embeddings:
    """Embed images with a `zoo.load` model; see the module docstring for inputs, backends and precisions.

    Inputs: a tensor batch (`[N, H, W]` grayscale or `[N, C, H, W]`, uint8 or float in [0, 1]), a list
    of PIL images or paths, a folder (recursive, by image extension), or a map-style torch Dataset
    (yielding an image or `(image, label)`). Unreadable inputs are skipped and reported in `.failed`.
    `batch_size` defaults to 256 for models of <= 64 px input, else 32. `num_workers` defaults to
    0 for tensors (preprocessed by one vectorised call per batch) and min(4, cores - 1) otherwise.
    `layer` / `pool`: features of another stage or pooling (module docstring); default layer4 + avg.
    """
    model = _stage_model(model, layer, pool, backend, precision)
    pre = _preprocess_of(model, preprocess)
    source = _make_source(inputs, pre, max_pixels)
    bs = int(batch_size or _default_batch_size(model))
    if bs < 1:
        raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
    runner = make_runner(model, backend, precision, device)
    batches = [list(range(s, min(s + bs, len(source)))) for s in range(0, len(source), bs)]
    workers = _default_workers(source, len(batches)) if num_workers is None else int(num_workers)
    feats, ids, failed, labels = [], [], [], []
    for kept, f, bad, lab in _run_batches(source, batches, runner, normalize, workers, progress):
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


# --------------------------------------------------------------------------------------------- shards
def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())


def _jsonable(x: Any) -> Any:
    return int(x) if isinstance(x, (np.integer,)) else x


def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _shard_name(s: int) -> str:
    return f"shard-{s:05d}"


def _finished_shards(out: Path, n_shards: int) -> dict[int, dict]:
    """Shards whose marker (written last, atomically) exists: those are complete on disk."""
    done = {}
    for s in range(n_shards):
        meta = out / "shards" / f"{_shard_name(s)}.json"
        if meta.exists():
            try:
                done[s] = json.loads(meta.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # a marker is written atomically; unreadable means foreign: redo the shard
    return done


def _write_index(out: Path, config: dict, n_shards: int, complete: bool) -> dict:
    done = _finished_shards(out, n_shards)
    shards = [{"name": _shard_name(s), "start": m["start"], "stop": m["stop"], "count": m["count"],
               "failed": len(m["failed"])} for s, m in sorted(done.items())]
    index = {"model": config.get("model"), "dim": next((m["dim"] for m in done.values() if m.get("dim")), None),
             "total_inputs": config["total"], "n_shards": n_shards, "finished": len(shards),
             "embedded": sum(s["count"] for s in shards), "failed": sum(s["failed"] for s in shards),
             "complete": complete, "merged": False, "shards": shards}
    _atomic_write_json(out / "index.json", index)
    return index


def embed_to_dir(model: torch.nn.Module, inputs: Any, out: str | os.PathLike, shard_size: int = 10000,
                 batch_size: int | None = None, device: str | torch.device | None = None, backend: str = "torch",
                 precision: str = "fp32", normalize: bool = True, progress: bool = True,
                 num_workers: int | None = None, merge: bool = True, model_info: dict | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, layer: str | None = None, pool: str = "avg") -> dict:
    """Embed a corpus into `out/` in shards; resumable, and split over ranks under `torchrun`.

    Layout: `config.json` (what is embedded, to refuse resuming a different run), `shards/shard-NNNNN.npy`
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
    base_model = model
    model = _stage_model(model, layer, pool, backend, precision)
    pre = _preprocess_of(model, preprocess=None)
    source = _make_source(inputs, pre, max_pixels)
    bs = int(batch_size or _default_batch_size(model))
    shard_size = int(shard_size)
    if shard_size < 1 or bs < 1:
        raise EmbedError(f"shard_size and batch_size must be >= 1, got {shard_size} and {bs}")
    we_init = False
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and dist.is_available() and not dist.is_initialized():
        dev = torch.device(device) if device is not None else _model_device(model)
        if dev.type == "cuda" and "LOCAL_RANK" in os.environ:  # one GPU per rank, as torchrun lays them out
            device = dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
            model.to(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        we_init = True
    rank, world = _dist_info()
    try:
        if world > 1:
            for t in model.state_dict().values():  # identical weights on every rank (untrained models too)
                dist.broadcast(t, 0)
        n = len(source)
        n_shards = max(1, -(-n // shard_size))
        spec = getattr(model, "spec", None)
        config = {"model": (model_info or {}).get("name", getattr(spec, "name", None)), "model_info": model_info,
                  "inputs": source.fingerprint(), "total": n, "shard_size": shard_size, "n_shards": n_shards,
                  "backend": backend, "precision": precision, "normalize": normalize}
        if model is not base_model:  # only when not the default, so folders written before still resume
            config.update(layer=model.layer, pool=model.pool)
            if model.pool == "none":
                config["map_shape"] = list(model.map_shape)
        (out / "shards").mkdir(parents=True, exist_ok=True)
        cfg_path = out / "config.json"
        if rank == 0:
            if cfg_path.exists():
                old = json.loads(cfg_path.read_text())
                keys = ("model", "inputs", "total", "shard_size", "backend", "precision", "normalize", "layer",
                        "pool")
                diff = [k for k in keys if old.get(k) != config.get(k)]
                if diff:
                    raise EmbedError(f"{out} holds a different embedding run ({', '.join(diff)} differ); "
                                     f"pass a new --out folder or delete {out}")
            _atomic_write_json(cfg_path, config)
        if world > 1:
            dist.barrier()
        done = _finished_shards(out, n_shards)
        mine = [s for s in range(n_shards) if s % world == rank and s not in done]
        if done and rank == 0:
            log.info("resuming %s: %d of %d shards already finished", out, len(done), n_shards)
        runner = make_runner(model, backend, precision, device)
        # Batches never cross a shard boundary, so each shard is written as soon as its last batch is in.
        batches, owner = [], []
        for s in mine:
            lo, hi = s * shard_size, min((s + 1) * shard_size, n)
            for b in range(lo, hi, bs):
                batches.append(list(range(b, min(b + bs, hi))))
                owner.append(s)
        remaining = {s: sum(1 for o in owner if o == s) for s in mine}
        acc: dict[int, dict[str, list]] = {s: {"f": [], "idx": [], "failed": [], "labels": []} for s in mine}
        workers = _default_workers(source, len(batches)) if num_workers is None else int(num_workers)
        desc = f"embed rank {rank}/{world}" if world > 1 else "embed"
        for b, (kept, f, bad, lab) in enumerate(_run_batches(source, batches, runner, normalize, workers,
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


def _finish_shard(out: Path, s: int, shard_size: int, n: int, a: dict, source: _Source, model, rank: int) -> None:
    d = a["f"][0].shape[1] if a["f"] else getattr(model, "feature_dim", 0)
    feats = np.concatenate(a["f"]) if a["f"] else np.zeros((0, d), np.float32)
    name = _shard_name(s)
    _atomic_save_npy(out / "shards" / f"{name}.npy", feats)
    labels = a["labels"] if a["labels"] and min(a["labels"]) >= 0 and source.labelled else None
    meta = {"start": s * shard_size, "stop": min((s + 1) * shard_size, n), "count": int(feats.shape[0]),
            "dim": int(d), "ids": [_jsonable(source.id(i)) for i in a["idx"]], "failed": a["failed"],
            "labels": labels, "rank": rank}
    _atomic_write_json(out / "shards" / f"{name}.json", meta)  # the marker: written after the features


def iter_shards(out: str | os.PathLike, mmap: bool = True) -> Iterator[tuple[np.ndarray, list[Any], dict]]:
    """(features, ids, shard metadata) of each finished shard of an `embed_to_dir` folder, in input order.

    Features are memory-mapped by default, so a corpus larger than memory can be streamed.
    """
    out = Path(out)
    index = json.loads((out / "index.json").read_text())
    for sh in index["shards"]:
        meta = json.loads((out / "shards" / f"{sh['name']}.json").read_text())
        feats = np.load(out / "shards" / f"{sh['name']}.npy", mmap_mode="r" if mmap else None)
        yield feats, meta["ids"], meta


def merge_shards(out: str | os.PathLike) -> dict:
    """Concatenate the shards of a complete `embed_to_dir` folder into `features.npy` + `ids.json`, streaming."""
    out = Path(out)
    index = json.loads((out / "index.json").read_text())
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
    _atomic_write_json(out / "ids.json", {"ids": ids, "failed": failed, "labels": labels})
    index["merged"] = True
    _atomic_write_json(out / "index.json", index)
    return index


def read_embeddings(out: str | os.PathLike) -> Embeddings:
    """The `Embeddings` of an `embed_to_dir` folder (merged file if present, else the shards concatenated)."""
    out = Path(out)
    config = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    shape = tuple(config["map_shape"]) if config.get("map_shape") else None
    if (out / "features.npy").exists() and (out / "ids.json").exists():
        meta = json.loads((out / "ids.json").read_text())
        feats = torch.from_numpy(np.load(out / "features.npy"))
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


class _CallableModule(type(sys)):
    """`zoo.embed` is both this module and the function: whichever `zoo.embed` resolves to, calling it embeds."""

    def __call__(self, *args: Any, **kwargs: Any) -> Embeddings:
        return embed(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
