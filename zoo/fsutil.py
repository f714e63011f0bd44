"""Atomic file writes: a kill mid-write never leaves a half-written file under the final name."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def current_umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_mode(folder: bool = False) -> int:
    """What open()/mkdir() would give: 0644 / 0755 under the usual umask 022 (mkstemp/mkdtemp give 0600/0700)."""
    return (0o777 if folder else 0o666) & ~current_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file beside `path`, fsync, then rename over it (with normal permissions)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, normal_mode())  # mkstemp's 0600 would make shared outputs unreadable to others
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """A float32 `.npy` file, written atomically (embedding shards, cached reference features)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32))
    atomic_write_bytes(path, buf.getvalue())


def replace_folder(tmp: Path, final: Path) -> None:
    """Rename a finished temp folder into place; an existing `final` is swapped out first, then removed."""
    # mkdtemp/mkstemp create private (0700/0600) entries: give the published folder normal permissions.
    tmp.chmod(0o755)
    for f in tmp.iterdir():
        f.chmod(0o644)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
