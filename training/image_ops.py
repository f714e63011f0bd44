"""The batched image operations of `training.augment`: float images `[N, C, H, W]` in [0, 1] in, the same out,
with one parameter per sample (factors, hue shifts, blur sigmas, crop boxes). No randomness here: the
augmenter draws every parameter and these apply them, following torchvision's semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


# ----------------------------------------------------------------------------- colour
def to_gray(x: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, 1, H, W] luma; a 1-channel image is its own gray."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # torchvision's blend on float images, factor * x + (1 - factor) * other clamped to [0, 1],
    # as one lerp (fewer passes over the batch)
    return torch.lerp(other.expand_as(x), x, factor.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # mean of the grayscale image = gray weights . per-channel means (no full gray image needed)
    means = x.mean(dim=(2, 3))
    if x.shape[1] == 3:
        means = means @ torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(3, 1)
    return blend(x, means.view(-1, 1, 1, 1), f)


def saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return blend(x, to_gray(x), f)


def hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn) per sample: RGB -> HSV -> RGB, batched, 3 channels."""
    r, g, b = x.unbind(1)
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)  # chroma
    s = c / torch.where(v > 0, v, 1.0)
    inv_c = 1.0 / torch.where(c > 0, c, 1.0)
    # hue in sixths of a turn by which channel is the max (r wins ties, then g), as torchvision
    h = torch.where(v == r, (g - b) * inv_c, torch.where(v == g, (b - r) * inv_c + 2.0, (r - g) * inv_c + 4.0))
    h = torch.where(c > 0, h, 0.0)
    h6 = torch.remainder(h + 6.0 * shift.view(-1, 1, 1), 6.0)  # shifted hue in [0, 6)
    # closed-form HSV -> RGB: channel = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6, n = 5, 3, 1
    vs = v * s
    out = torch.empty_like(x)
    for ch, n in enumerate((5.0, 3.0, 1.0)):
        k = h6 + n
        k = torch.where(k >= 6.0, k - 6.0, k)
        torch.addcmul(v, vs, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0), value=-1.0, out=out[:, ch])
    return out


JITTER_OPS = (brightness, contrast, saturation, hue)  # fn_idx order of torchvision's ColorJitter
JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Per-sample Gaussian blur: reflect padding (as torchvision), separable depthwise convolution."""
    n, c, h, w = x.shape
    t = torch.arange(k, device=x.device, dtype=x.dtype) - (k - 1) / 2
    kern = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [n*c, k]
    p = k // 2
    y = F.pad(x.reshape(1, n * c, h, w), (p, p, p, p), mode="reflect")
    # pad once on all sides, then 1-D passes: identical to torchvision's padded 2-D kernel
    y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
    y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
    return y.view(n, c, h, w)


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def crop_flip(x: torch.Tensor, i: torch.Tensor, j: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
               flip: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box (i, j, h, w) in source pixels, resized to size x size, mirrored where flip: one
    affine grid_sample. With align_corners=False, output pixel k samples source j + (k + 0.5) w/S - 0.5,
    the same points as a crop followed by a bilinear resize (without antialiasing)."""
    b, c, height, width = x.shape
    theta = torch.zeros(b, 2, 3, dtype=torch.float64, device=i.device)
    theta[:, 0, 0] = w / width * (1.0 - 2.0 * flip)
    theta[:, 0, 2] = (2.0 * j + w) / width - 1.0
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2.0 * i + h) / height - 1.0
    # crop-then-resize clamps samples to the crop's outer pixel centres (it never sees pixels outside
    # the box); clamping the grid to those centres reproduces that exactly
    lo = torch.stack([(2.0 * j + 1.0) / width, (2.0 * i + 1.0) / height], dim=1) - 1.0
    hi = torch.stack([(2.0 * (j + w) - 1.0) / width, (2.0 * (i + h) - 1.0) / height], dim=1) - 1.0
    theta, lo, hi = (t.to(device=x.device, dtype=x.dtype) for t in (theta, lo, hi))
    grid = F.affine_grid(theta, [b, c, size, size], align_corners=False)
    grid = torch.maximum(torch.minimum(grid, hi.view(b, 1, 1, 2)), lo.view(b, 1, 1, 2))
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
