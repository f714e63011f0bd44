"""Retrieval pictures: one row per query, the query then its k nearest neighbours with scores and labels."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CAPTION = 30  # pixels of text under each thumbnail (two short lines)
GAP = 6


@dataclass
class GridRow:
    """A query image and its neighbours: images are PIL images, paths, or uint8 arrays/tensors."""

    query: Any
    neighbours: Sequence[Any]
    scores: Sequence[float]
    query_label: str | None = None
    labels: Sequence[str | None] | None = None


def _font(size: int = 11):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def to_thumbnail(item: Any, side: int) -> Image.Image:
    """An RGB thumbnail of `side` x `side` (letterboxed); unreadable items become a grey tile with '?'."""
    from zoo.images import UnreadableImage, read_image, to_model_image

    try:
        if isinstance(item, (str, os.PathLike)):
            im = read_image(item)
        elif isinstance(item, Image.Image):
            im = to_model_image(item)
        else:
            a = item.detach().cpu().numpy() if hasattr(item, "detach") else np.asarray(item)
            a = np.squeeze(a)
            if a.ndim == 3 and a.shape[0] in (1, 3):
                a = np.moveaxis(a, 0, -1).squeeze()
            if a.dtype != np.uint8:
                a = np.clip(a * 255 if a.max() <= 1 else a, 0, 255).astype(np.uint8)
            im = Image.fromarray(a)
        im = im.convert("RGB")
    except (UnreadableImage, ValueError, TypeError, OSError):
        tile = Image.new("RGB", (side, side), (200, 200, 200))
        ImageDraw.Draw(tile).text((side // 2 - 3, side // 2 - 6), "?", fill=(90, 90, 90), font=_font(14))
        return tile
    im.thumbnail((side, side), Image.Resampling.NEAREST if max(im.size) < side else Image.Resampling.BICUBIC)
    if max(im.size) < side:  # small images (28 px) are scaled up with crisp pixels
        scale = side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.NEAREST)
    tile = Image.new("RGB", (side, side), (255, 255, 255))
    tile.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
    return tile


def retrieval_grid(rows: Sequence[GridRow], out: str | os.PathLike, thumb: int = 96,
                   score_name: str = "sim") -> Path:
    """Write a PNG: per row the query (blue frame), then its neighbours, each captioned score + label."""
    if not rows:
        raise ValueError("retrieval_grid needs at least one row")
    k = max(len(r.neighbours) for r in rows)
    cell_w, cell_h = thumb + GAP, thumb + CAPTION + GAP
    width = GAP + cell_w * (k + 1) + GAP * 2
    height = GAP + cell_h * len(rows)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()

    def caption(x: int, y: int, lines: list[str], colour=(20, 20, 20)) -> None:
        for j, line in enumerate(lines[:2]):
            text = line if len(line) <= thumb // 6 else line[: thumb // 6 - 1] + "…"
            draw.text((x, y + 2 + 13 * j), text, fill=colour, font=font)

    for r, row in enumerate(rows):
        y = GAP + r * cell_h
        canvas.paste(to_thumbnail(row.query, thumb), (GAP, y))
        draw.rectangle([GAP - 2, y - 2, GAP + thumb + 1, y + thumb + 1], outline=(30, 90, 200), width=2)
        caption(GAP, y + thumb, ["query", row.query_label or ""])
        labels = list(row.labels) if row.labels is not None else [None] * len(row.neighbours)
        for j, (item, score) in enumerate(zip(row.neighbours, row.scores)):
            x = GAP * 3 + cell_w * (j + 1)
            canvas.paste(to_thumbnail(item, thumb), (x, y))
            label = labels[j] if j < len(labels) else None
            same = row.query_label is not None and label is not None and str(label) == str(row.query_label)
            colour = (0, 120, 0) if same else (20, 20, 20)
            caption(x, y + thumb, [f"{score_name} {float(score):.3f}", "" if label is None else str(label)], colour)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
