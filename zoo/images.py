"""Image decoding for every consumer of image files: `zoo.embed`, the CLI and the trainer's folders.

`IMAGE_EXTENSIONS` is the one list of file extensions ssl-zoo treats as images: what `embed` finds in
a folder is what the trainer trains on. `read_image` decodes one file to 8-bit 'L' or 'RGB' (EXIF
orientation applied, transparency composited on white, 16-bit and float grayscale scaled), refusing
empty, corrupt and oversized files with `UnreadableImage` and a one-line reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".pnm", ".jfif"})
# PIL's own guard (89.5 Mpixels): past it a decoder may allocate gigabytes for one file.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 89_478_485)


class UnreadableImage(Exception):
    """An input that cannot become an image; the message is the reason reported in `Embeddings.failed`."""


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


def list_images(folder: str | os.PathLike, include_broken_links: bool = False) -> list[str]:
    """Image files under `folder`, recursively, by extension (case-insensitive), in sorted path order.

    `include_broken_links`: also list image-named symlinks that resolve to nothing (a loop, a missing
    target), so `zoo.embed` reports each in `.failed` with its reason instead of skipping it silently.
    """
    root = Path(folder)
    found = [str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
             and (p.is_file() or (include_broken_links and p.is_symlink() and not p.exists()))]
    return sorted(found)

