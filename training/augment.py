"""Batched multi-view augmentation on uint8 image batches, with per-sample random parameters.

Why by hand: torchvision.transforms.v2 draws ONE parameter set per call and applies it to the whole
batch, while SSL needs independent parameters for every sample and view. So every random number is
drawn here, vectorised, from the `torch.Generator` the trainer passes in (never the global RNG:
resumed runs and DDP ranks must see the same views), and every image op is a batched tensor op on
the images' device (GPU when there is one).

Per view: random resized crop + horizontal flip (one `affine_grid` + `grid_sample`) -> colour
jitter (prob `jitter_p`, random op order per sample) -> grayscale -> Gaussian blur -> solarize ->
normalise, i.e. EquiMod's / SimCLR's order. Semantics follow torchvision's (factor ranges, the
10-try crop sampler with its centre-crop fallback, blend-with-clamp colour ops, grayscale weights).

Known deviations from the PIL/torchvision reference pipelines:
- crops are resampled bilinearly without antialiasing (grid_sample), not bicubic; crops are mostly
  upsampled, where antialiasing does nothing.
- W-MSE's reference jitters before cropping; we always crop first (only contrast, which uses the
  image mean, is not pointwise, so the difference is small).
- blur sigma is a Gaussian sigma (torchvision GaussianBlur), not a PIL blur radius (ISD, W-MSE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from training.image_ops import JITTER_IDENTITY, JITTER_OPS, crop_flip, gaussian_blur, resize, to_gray
from training.views import Views

# EquiMod's parameter groups and their lengths (docs/methods/equimod.md §3).
PARAM_SIZES: dict[str, int] = {"crop": 5, "jitter": 10, "blur": 2, "solarize": 1}
_CROP_TRIES = 10  # torchvision RandomResizedCrop tries 10 times before its centre-crop fallback

# Column layout of the uniform draws of one view. Every view always draws all columns, whatever its
# probabilities, so changing one probability (e.g. flip_p) leaves every other draw unchanged.
_SCALE = slice(0, _CROP_TRIES)
_RATIO = slice(_CROP_TRIES, 2 * _CROP_TRIES)
_TOP, _LEFT, _FLIP = 20, 21, 22
_JIT_APPLY, _ORDER, _FACTORS, _GRAY = 23, slice(24, 28), slice(28, 32), 32
_BLUR_APPLY, _SIGMA, _SOLARIZE = 33, 34, 35
_N_DRAWS = 36

_VIEW_KEYS_EXTRA = ("repeat",)
_CONFIG_KEYS = ("views", "params", "original")


@dataclass
class PipelineConfig:
    """One view's augmentation pipeline (probabilities are per sample)."""

    crop_size: int = 32
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None  # odd; None -> about 10% of crop_size, odd, >= 3
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] images (PIL's 128 is 128/255)
    identity: bool = False  # the un-augmented view: resize to crop_size only

    def __post_init__(self) -> None:
        # YAML gives lists; keep tuples so configs compare and hash predictably.
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)  # type: ignore[assignment]
        self.jitter = tuple(float(v) for v in self.jitter)  # type: ignore[assignment]
        self.blur_sigma = tuple(float(v) for v in self.blur_sigma)  # type: ignore[assignment]
        if int(self.crop_size) != self.crop_size or self.crop_size < 1:
            raise ValueError(f"crop_size must be a positive integer, got {self.crop_size}")
        self.crop_size = int(self.crop_size)
        for name, pair in (("crop_scale", self.crop_scale), ("crop_ratio", self.crop_ratio),
                           ("blur_sigma", self.blur_sigma)):
            if len(pair) != 2 or pair[0] > pair[1] or pair[0] < 0:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {pair}")
        if not 0 < self.crop_scale[1] <= 1.0 or self.crop_ratio[0] <= 0:
            raise ValueError(f"crop_scale must lie in (0, 1] and crop_ratio be positive, got "
                             f"{self.crop_scale}, {self.crop_ratio}")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter must be 4 non-negative strengths (brightness, contrast, saturation, hue "
                             f"<= 0.5), got {self.jitter}")
        for name in ("flip_p", "jitter_p", "gray_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        k = self.kernel_size
        if k < 1 or k % 2 == 0 or k // 2 >= self.crop_size:
            raise ValueError(f"blur_kernel must be odd and smaller than 2 * crop_size, got {k}")

    @property
    def kernel_size(self) -> int:
        """Blur kernel side: given, or ~10% of the crop made odd (224 -> 23, as SimCLR), at least 3."""
        if self.blur_kernel is not None:
            return int(self.blur_kernel)
        k = max(3, int(0.1 * self.crop_size))
        return k if k % 2 else k + 1


# ----------------------------------------------------------------------------- sampling
def _sample_crops(u: torch.Tensor, height: int, width: int, scale: tuple[float, float],
                  ratio: tuple[float, float]) -> tuple[torch.Tensor, ...]:
    """torchvision RandomResizedCrop.get_params for every sample at once: all 10 tries drawn, first
    valid one kept, centre-crop fallback. Returns float64 (i, j, h, w), each [B]."""
    u = u.double()
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, _SCALE])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lo + (hi - lo) * u[:, _RATIO])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = ok.any(dim=1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    # torch.randint(0, height - h + 1) as floor(u * count)
    i = torch.minimum(torch.floor(u[:, _TOP] * (height - h + 1)), height - h)
    j = torch.minimum(torch.floor(u[:, _LEFT] * (width - w + 1)), width - w)
    i = torch.where(found, i, torch.full_like(i, (height - fh) // 2))
    j = torch.where(found, j, torch.full_like(j, (width - fw) // 2))
    return i, j, h, w


# ----------------------------------------------------------------------------- the augmenter
class BatchAugment:
    """V views of a uint8 batch `[B, C, H, W]` (C = 1 or 3), one per pipeline, each float32
    `[B, 3, S, S]` normalised; optional EquiMod parameter vectors and un-augmented originals."""

    def __init__(self, pipelines: list[PipelineConfig], mean: Sequence[float], std: Sequence[float],
                 param_groups: list[str] | None = None, return_original: bool = False,
                 cpu_threads: int | None = 1):
        if not pipelines:
            raise ValueError("BatchAugment needs at least one pipeline (view)")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values each (std > 0), got {mean}, {std}")
        if param_groups is not None:
            unknown = [g for g in param_groups if g not in PARAM_SIZES]
            if unknown or len(set(param_groups)) != len(param_groups) or not param_groups:
                raise ValueError(f"param groups must be distinct names from {list(PARAM_SIZES)}, "
                                 f"got {param_groups}")
            param_groups = list(param_groups)
        self.pipelines = list(pipelines)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.param_groups = param_groups
        self.return_original = bool(return_original)
        # On CPU the augmentation is many small ops: with torch's intra-op threads each op waits at a
        # barrier for every thread, which on shared cores was measured 3-10x slower (median) than one
        # thread. So CPU batches run with `cpu_threads` threads (restored after); None leaves torch's.
        self.cpu_threads = cpu_threads
        self._norm_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def param_dim(self) -> int:
        """Length P of each parameter vector (0 without param groups)."""
        return sum(PARAM_SIZES[g] for g in self.param_groups or [])

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> Views:
        prev = torch.get_num_threads()
        if images.device.type != "cpu" or not self.cpu_threads or prev <= self.cpu_threads:
            return self._augment(images, generator)
        torch.set_num_threads(self.cpu_threads)
        try:
            return self._augment(images, generator)
        finally:
            torch.set_num_threads(prev)

    def _augment(self, images: torch.Tensor, generator: torch.Generator) -> Views:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float().mul_(1.0 / 255.0)
        elif images.is_floating_point():
            x = images.float()  # already in [0, 1]
        else:
            raise ValueError(f"expected uint8 (or float in [0, 1]) images, got {images.dtype}")
        views, params = [], []
        for cfg in self.pipelines:
            view, p = self._view(x, cfg, generator)
            views.append(self._normalize(view))
            params.append(p)
        original = None
        if self.return_original:
            original = self._normalize(resize(x, self.pipelines[0].crop_size))
        return Views(views=views, params=params if self.param_groups is not None else None, original=original)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._norm_cache:
            inv = torch.tensor([1.0 / s for s in self.std], device=x.device).view(1, 3, 1, 1)
            shift = -torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1) * inv
            self._norm_cache[x.device] = (shift, inv)
        shift, inv = self._norm_cache[x.device]
        # (x - mean) / std as one fused multiply-add (measured 4x faster than sub+div on CPU);
        # broadcasting a 1-channel image against 3-channel mean/std repeats it to 3 channels
        return torch.addcmul(shift, x, inv).contiguous()

    def _view(self, x: torch.Tensor, cfg: PipelineConfig,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, c, height, width = x.shape
        dev = x.device
        if cfg.identity:
            p = None
            if self.param_groups is not None:
                zeros = torch.zeros(b, dtype=torch.float64)
                full = torch.full_like
                p = self._params(zeros, zeros, full(zeros, height), full(zeros, width), zeros,
                                 torch.zeros(b, dtype=torch.bool), torch.arange(4).expand(b, 4),
                                 torch.tensor(JITTER_IDENTITY, dtype=torch.float64).expand(b, 4),
                                 torch.zeros(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool), zeros,
                                 torch.zeros(b, dtype=torch.bool), dev)
            return resize(x, cfg.crop_size), p

        # All draws on the generator's device (the trainer's is a CPU generator), so masks and index
        # lists are built there: a GPU batch never waits on a device-to-host copy.
        u = torch.rand(b, _N_DRAWS, generator=generator, device=generator.device).cpu()
        i, j, h, w = _sample_crops(u, height, width, cfg.crop_scale, cfg.crop_ratio)
        flip = u[:, _FLIP] < cfg.flip_p
        out = crop_flip(x, i, j, h, w, flip.double(), cfg.crop_size)

        # colour jitter: per-sample op order (argsort of uniforms = a uniform random permutation)
        jit = u[:, _JIT_APPLY] < cfg.jitter_p
        order = torch.argsort(u[:, _ORDER], dim=1)
        strength = torch.tensor(cfg.jitter, dtype=torch.float64)
        lo = torch.tensor([max(0.0, 1.0 - v) for v in cfg.jitter[:3]] + [-cfg.jitter[3]], dtype=torch.float64)
        hi = torch.cat([1.0 + strength[:3], strength[3:]])
        factors = lo + (hi - lo) * u[:, _FACTORS].double()
        # ops a pipeline switches off (strength 0) or that do nothing on grayscale input are skipped,
        # but they still take a slot in the order, as in torchvision
        active = [cfg.jitter[0] > 0, cfg.jitter[1] > 0, cfg.jitter[2] > 0 and c == 3, cfg.jitter[3] > 0 and c == 3]
        if bool(jit.any()) and any(active):
            f_dev = factors.to(dev, torch.float32)
            for slot in range(4):  # vectorise per slot: each op on the samples that run it in this slot
                for op in range(4):
                    if not active[op]:
                        continue
                    idx = (jit & (order[:, slot] == op)).nonzero().squeeze(1)
                    if idx.numel() == 0:
                        continue
                    idx = idx.to(dev)
                    out[idx] = JITTER_OPS[op](out[idx], f_dev[idx, op])

        gray = u[:, _GRAY] < cfg.gray_p
        if c == 3 and bool(gray.any()):
            idx = gray.nonzero().squeeze(1).to(dev)
            out[idx] = to_gray(out[idx]).expand(-1, 3, -1, -1)

        blur = u[:, _BLUR_APPLY] < cfg.blur_p
        sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[:, _SIGMA].double()
        if bool(blur.any()):
            sel = blur.nonzero().squeeze(1)
            idx = sel.to(dev)
            out[idx] = gaussian_blur(out[idx], sigma[sel].to(dev, torch.float32), cfg.kernel_size)

        solar = u[:, _SOLARIZE] < cfg.solarize_p
        if bool(solar.any()):
            idx = solar.nonzero().squeeze(1).to(dev)
            y = out[idx]
            out[idx] = torch.where(y >= cfg.solarize_threshold, 1.0 - y, y)

        p = None
        if self.param_groups is not None:
            p = self._params(i, j, h, w, flip.double(), jit, order, factors, gray, blur, sigma, solar, dev)
        return out, p

    def _params(self, i: torch.Tensor, j: torch.Tensor, h: torch.Tensor, w: torch.Tensor, flip: torch.Tensor,
                jit: torch.Tensor, order: torch.Tensor, factors: torch.Tensor, gray: torch.Tensor,
                blur: torch.Tensor, sigma: torch.Tensor, solar: torch.Tensor, device: torch.device) -> torch.Tensor:
        """EquiMod's raw vector, groups in `param_groups` order: crop [i, j, h, w, flip]; jitter
        [applied, o0..o3, brightness, contrast, saturation, hue, gray] (identity order/factors when
        not applied); blur [applied, sigma (0 when not applied)]; solarize [applied]."""
        jf = jit.double().unsqueeze(1)
        order = torch.where(jit.unsqueeze(1), order, torch.arange(4).expand_as(order)).double()
        ident = torch.tensor(JITTER_IDENTITY, dtype=torch.float64)
        factors = jf * factors + (1.0 - jf) * ident
        groups = {
            "crop": torch.stack([i, j, h, w, flip], dim=1),
            "jitter": torch.cat([jf, order, factors, gray.double().unsqueeze(1)], dim=1),
            "blur": torch.stack([blur.double(), torch.where(blur, sigma, torch.zeros_like(sigma))], dim=1),
            "solarize": solar.double().unsqueeze(1),
        }
        return torch.cat([groups[g] for g in self.param_groups or []], dim=1).to(device, torch.float32)


def build_augment(config: dict[str, Any], mean: Sequence[float], std: Sequence[float]) -> BatchAugment:
    """BatchAugment from a recipe's `augment:` section:
    `views` (list of PipelineConfig fields, `repeat: n` duplicates an entry), optional `params`
    (EquiMod groups, e.g. [crop, jitter]) and `original` (bool)."""
    if not isinstance(config, dict):
        raise ValueError(f"augment config must be a mapping, got {type(config).__name__}")
    for key in config:
        if key not in _CONFIG_KEYS:
            raise ValueError(f"unknown augment key {key!r}; allowed: {', '.join(_CONFIG_KEYS)}")
    entries = config.get("views")
    if not entries or not isinstance(entries, list):
        raise ValueError("augment.views must be a non-empty list of view pipelines")
    allowed = [f.name for f in fields(PipelineConfig)] + list(_VIEW_KEYS_EXTRA)
    pipelines = []
    for n, entry in enumerate(entries):
        entry = dict(entry or {})
        for key in entry:
            if key not in allowed:
                raise ValueError(f"unknown key {key!r} in augment.views[{n}]; allowed: {', '.join(allowed)}")
        repeat = entry.pop("repeat", 1)
        if int(repeat) != repeat or repeat < 1:
            raise ValueError(f"augment.views[{n}].repeat must be a positive integer, got {repeat}")
        pipelines.extend(PipelineConfig(**entry) for _ in range(int(repeat)))
    params = config.get("params")
    if params is not None and not isinstance(params, list):
        raise ValueError(f"augment.params must be a list of groups from {list(PARAM_SIZES)}, got {params!r}")
    return BatchAugment(pipelines, mean, std, param_groups=params, return_original=bool(config.get("original", False)))
