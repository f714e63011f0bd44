"""Generate the bad-input corpus for `zoo.embed`: every awkward file a real photo folder holds.

    python tests/make_bad_images.py OUT_DIR

`make_bad_images(folder)` writes the files and returns `{relative path: None or reason fragment}`:
None means the file must be embedded, a string is a fragment of the reason it must be skipped with.
Files are tiny (tens of pixels) except the two decompression bombs, which are real, valid PNGs
whose pixels compress ~1000:1, so the corpus is written in well under a second.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

W, H = 40, 24  # not square, so a missed EXIF rotation shows up as a different shape


def _photo(seed: int = 0) -> np.ndarray:
    """A smooth colour image (gradients + a disc): JPEG-friendly and different from its rotations."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    r = (xx * 255 / W).astype(np.uint8)
    g = (yy * 255 / H).astype(np.uint8)
    b = np.where((xx - 12) ** 2 + (yy - 10) ** 2 < 36, 230, 40).astype(np.uint8)
    img = np.stack([r, g, b], -1)
    return np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_raw(path: Path, width: int, height: int, bit_depth: int, color_type: int, rows) -> None:
    """A PNG from raw scanlines (filter byte 0 added here), streamed: for 16-bit RGB and the bombs."""
    comp = zlib.compressobj(9)
    idat = bytearray()
    for row in rows:
        idat += comp.compress(b"\x00" + row)
    idat += comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", bytes(idat))
                     + _png_chunk(b"IEND", b""))


def _bomb(path: Path, side: int) -> None:
    """A valid 1-bit grayscale PNG of side x side black pixels (a few hundred KB on disk)."""
    row = bytes((side + 7) // 8)
    write_png_raw(path, side, side, 1, 0, (row for _ in range(side)))


def make_bad_images(folder: str | Path) -> dict[str, str | None]:
    folder = Path(folder)
    (folder / "nested" / "deeper").mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(_photo())
    expect: dict[str, str | None] = {}

    def save(name: str, image: Image.Image, **kw) -> None:
        image.save(folder / name, **kw)
        expect[name] = None

    # Valid images in every mode a folder holds.
    save("rgb.jpg", photo, quality=95)
    save("rgb.png", photo)
    save("gray.png", photo.convert("L"))
    save("gray.jpg", photo.convert("L"), quality=95)
    save("cmyk.jpg", photo.convert("CMYK"), quality=95)
    save("rgba.png", photo.convert("RGBA"))
    save("palette.png", photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32))
    pal_t = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    save("palette_transparent.png", pal_t, transparency=0)
    save("gray_alpha.png", photo.convert("LA"))
    save("bilevel.png", photo.convert("1"))
    save("UPPER_CASE.JPG", photo, quality=95)
    save("nested/deeper/nested.bmp", photo)
    if _has_webp():
        save("photo.webp", photo, lossless=True)
    # RGBA whose every pixel is transparent: must come out as the white background, not as its hidden RGB.
    hidden = np.dstack([_photo(1), np.zeros((H, W), np.uint8)])
    save("transparent.png", Image.fromarray(hidden))
    # 16-bit grayscale: full range values, which convert("L") would clip to white.
    gray16 = (np.asarray(photo.convert("L")).astype(np.uint16) * 257)
    save("gray16.png", Image.fromarray(gray16))
    # 16-bit RGB (48-bit PNG), written by hand: PIL cannot save it.
    rgb16 = (_photo(2).astype(">u2") * 257)
    write_png_raw(folder / "rgb16.png", W, H, 16, 2, (rgb16[y].tobytes() for y in range(H)))
    expect["rgb16.png"] = None
    # EXIF orientation 6: stored landscape, displayed portrait (rotate 90 degrees clockwise).
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", photo, quality=95, exif=exif)

    # Files that must be skipped with their reason.
    (folder / "empty.jpg").write_bytes(b"")
    expect["empty.jpg"] = "empty file"
    (folder / "text.jpg").write_text("this is a text file wearing a .jpg extension\n")
    expect["text.jpg"] = "not an image"
    buf = io.BytesIO()
    Image.fromarray(_photo(3)).resize((160, 96)).save(buf, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    expect["truncated.jpg"] = "truncated"
    good_png = io.BytesIO()
    photo.save(good_png, "PNG")
    data = bytearray(good_png.getvalue())
    start = data.index(b"IDAT") + 4
    data[start: start + 40] = bytes(40)  # zero the start of the compressed stream: a corrupt deflate
    (folder / "corrupt.png").write_bytes(bytes(data))
    expect["corrupt.png"] = "corrupt"
    _bomb(folder / "bomb.png", 12_000)  # 144 Mpixels: over PIL's 89 M limit, under its 2x hard error
    expect["bomb.png"] = "decompression-bomb"
    _bomb(folder / "nested" / "huge_bomb.png", 30_000)  # 900 Mpixels: PIL's own DecompressionBombError
    expect["nested/huge_bomb.png"] = "decompression-bomb"

    # Not images by extension: never listed.
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "nested" / "README").write_text("no extension\n")
    return expect


def _has_webp() -> bool:
    from PIL import features

    return bool(features.check("webp"))


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "bad-images")
    for name, reason in sorted(make_bad_images(out).items()):
        print(f"{name:32s} {'embed' if reason is None else 'skip: ' + reason}")
