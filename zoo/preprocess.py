"""Evaluation preprocessing matching each recipe's eval transform."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T


class Preprocess:
    """Resize -> centre crop -> float in [0, 1] -> 3 channels -> normalise.

    Accepts a PIL image (any mode), a uint8 tensor `[C, H, W]` / `[N, C, H, W]` / `[H, W]`, or a
    float tensor in [0, 1]. Grayscale is repeated to 3 channels (the backbones' input convention).
    Returns float32 `[3, S, S]` for one image or `[N, 3, S, S]` for a batch.
    """

    def __init__(self, input_size: int, resize_size: int, mean: Sequence[float], std: Sequence[float],
                 interpolation: str = "bilinear"):
        self.input_size, self.resize_size = input_size, resize_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self._geometry = T.Compose([
            T.Resize(resize_size, interpolation=InterpolationMode(interpolation), antialias=True),
            T.CenterCrop(input_size),
        ])
        self._normalize = T.Normalize(self.mean, self.std)

    @classmethod
    def from_spec(cls, spec: Any) -> "Preprocess":
        return cls(spec.input_size, spec.resize_size, spec.mean, spec.std, spec.interpolation)

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(image, Image.Image):
            image = image.convert("L") if image.mode in ("L", "I;16", "I", "1", "LA") else image.convert("RGB")
            x = T.functional.pil_to_tensor(image)
        elif isinstance(image, torch.Tensor):
            x = image if image.dim() != 2 else image[None]
        else:
            raise TypeError(f"expected a PIL image or a tensor, got {type(image).__name__}")
        if x.dim() not in (3, 4) or x.shape[-3] not in (1, 3):
            raise ValueError(f"expected an image [C, H, W] or batch [N, C, H, W] with 1 or 3 channels, "
                             f"got shape {tuple(x.shape)}")
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size) or self.resize_size != self.input_size:
            x = self._geometry(x)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-3] == 1:
            x = x.expand(*x.shape[:-3], 3, *x.shape[-2:])
        return self._normalize(x)

    def __repr__(self) -> str:
        return (f"Preprocess(input_size={self.input_size}, resize_size={self.resize_size}, mean={self.mean}, "
                f"std={self.std}, interpolation={self.interpolation!r})")
