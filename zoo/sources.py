"""Input sources of `zoo.embed`: whatever the inputs are, items addressable by position.

A `Source` decodes and preprocesses one whole batch per call (`batch(indices)`), in a DataLoader
worker; an input that cannot be read is reported with its reason, never raised. `make_source` picks
the source for a tensor or array batch, a folder (recursive, by `zoo.images.IMAGE_EXTENSIONS`), a
file, PIL images or paths, or a map-style torch Dataset.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from zoo.errors import EmbedError
from zoo.images import DEFAULT_MAX_PIXELS, UnreadableImage, list_images, read_image, to_model_image


class Source:
    """Inputs addressable by position; `batch(indices)` runs in a DataLoader worker (decode + preprocess)."""

    labelled = False

    def __init__(self, preprocess: Callable[[Any], torch.Tensor]):
        self.preprocess = preprocess
        self.device: torch.device | None = None  # where in-memory tensors are preprocessed (None: the host)

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


def _range(t: torch.Tensor) -> tuple[float, float]:
    try:
        return t.min().item(), t.max().item()
    except RuntimeError:  # min/max are not implemented for every dtype (uint16/32/64): numpy has them all
        a = t.cpu().numpy()
        return a.min().item(), a.max().item()


def checked_pixels(t: torch.Tensor) -> torch.Tensor:
    """A batch `[N, C, H, W]` as uint8 (integer dtypes) or float in [0, 1]; one-line EmbedError otherwise.

    uint8 is 0-255. Other integer dtypes are read as 0-255 pixel values too (converted to uint8), so
    `torch.randint(0, 255, ...)` embeds like its uint8 copy; values outside [0, 255] are refused. Floats
    must lie in [0, 1]: a float batch with values above 1 is refused rather than guessed to be 0-255
    (one 0-1 image whose maximum is 1.5 after an augmentation would otherwise be rescaled silently).
    """
    if t.dtype == torch.bool or t.is_complex():
        raise EmbedError(f"a {t.dtype} tensor is not an image; pass uint8 (0-255) or float in [0, 1]")
    if any(s == 0 for s in t.shape[1:]):
        raise EmbedError(f"a tensor input of shape {tuple(t.shape)} holds empty images; each image needs "
                         f"channels, height and width >= 1")
    if t.dtype == torch.uint8 or t.numel() == 0:
        return t
    if t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise EmbedError(f"the tensor input holds {bad} NaN or inf value(s); images must be finite, float in "
                             f"[0, 1] or uint8")
        lo, hi = _range(t)
        if lo < 0 or hi > 1:
            raise EmbedError(f"float images must be in [0, 1] (got values in [{lo:g}, {hi:g}]); divide by 255 (or "
                             f"pass uint8)")
        return t
    lo, hi = _range(t)
    if lo < 0 or hi > 255:
        raise EmbedError(f"integer images are read as 0-255 pixel values, got values in [{lo}, {hi}]; pass uint8 "
                         f"(0-255) or float in [0, 1]")
    return t.to(torch.uint8)


class TensorSource(Source):
    """A batch tensor `[N, H, W]` (grayscale) or `[N, C, H, W]`: uint8 or other integers in 0-255, or float in
    [0, 1] (`checked_pixels`)."""

    def __init__(self, tensor: torch.Tensor, preprocess):
        super().__init__(preprocess)
        if tensor.dim() == 3:
            tensor = tensor[:, None]
        if tensor.dim() != 4:
            raise EmbedError(f"a tensor input must be a batch [N, H, W] or [N, C, H, W], got shape "
                             f"{tuple(tensor.shape)}; add a batch dim with x[None]")
        self.tensor = checked_pixels(tensor)

    def __len__(self) -> int:
        return self.tensor.shape[0]

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        idx = list(indices)
        chunk = self.tensor[idx]
        if self.device is not None and self.device.type != "cpu" and chunk.device != self.device:
            # Move the compact uint8 batch, not 4x larger floats; resize and normalise run on the device.
            chunk = chunk.pin_memory().to(self.device, non_blocking=True)
        x = self.preprocess(chunk)  # one vectorised call per batch
        if not chunk.is_floating_point():  # integer pixels cannot be NaN: no check, no device sync
            return {"x": x, "idx": idx, "failed": [], "labels": torch.full((len(idx),), -1, dtype=torch.int64)}
        ok = torch.isfinite(x.flatten(1)).all(1)
        kept = [i for i, good in zip(idx, ok.tolist()) if good]
        failed = [(i, "image has NaN or inf values") for i, good in zip(idx, ok.tolist()) if not good]
        return {"x": x[ok], "idx": kept, "failed": failed, "labels": torch.full((len(kept),), -1, dtype=torch.int64)}

    def fingerprint(self) -> str:
        t = self.tensor
        sample = t[:: max(1, len(t) // 64)].contiguous()
        return f"tensor:{tuple(t.shape)}:{t.dtype}:{hashlib.sha256(sample.cpu().numpy().tobytes()).hexdigest()[:16]}"


class ListSource(Source):
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


class DatasetSource(Source):
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


def make_source(inputs: Any, preprocess: Callable[[Any], torch.Tensor], max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> Source:
    """The source for any input `embed` takes (tensor, array, folder, file, PIL image, Dataset, list)."""
    if isinstance(inputs, np.ndarray):
        inputs = torch.from_numpy(inputs)
    if torch.is_tensor(inputs):
        return TensorSource(inputs, preprocess)
    if isinstance(inputs, (str, os.PathLike)):
        p = Path(inputs)
        if p.is_dir():
            return ListSource(list_images(p, include_broken_links=True), preprocess, max_pixels)
        if p.is_file():
            return ListSource([str(inputs)], preprocess, max_pixels)
        raise EmbedError(f"{inputs} is neither a folder nor a file")
    if isinstance(inputs, Image.Image):
        return ListSource([inputs], preprocess, max_pixels)
    if isinstance(inputs, torch.utils.data.Dataset) and hasattr(inputs, "__getitem__") and hasattr(inputs, "__len__"):
        return DatasetSource(inputs, preprocess, max_pixels)
    if isinstance(inputs, (list, tuple)):
        return ListSource(inputs, preprocess, max_pixels)
    raise EmbedError(f"cannot embed a {type(inputs).__name__}: pass a tensor batch, a list of PIL images or paths, "
                     f"a folder, or a map-style torch Dataset")
