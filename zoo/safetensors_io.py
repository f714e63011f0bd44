"""The published weight file: a backbone state dict as safetensors, fp32 (default) or fp16.

Keys are the backbone's own (torchvision ResNet names without `fc.*`); the header metadata names the
format version so a future layout change can be detected, and records dtype, arch and model name.
An fp16 file loads back as fp32 (`load_backbone`, and `zoo.load` casts to the module's dtype).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from zoo.errors import IntegrityError

FORMAT_NAME = "ssl-zoo/backbone"
FORMAT_VERSION = "1"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


def prepare_state(state: dict[str, torch.Tensor], dtype: str = "float32") -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared tensors; floating ones cast to `dtype` (integer buffers kept as they are)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] is a {type(value).__name__}, not a tensor; pass a module's state_dict()")
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.to(DTYPES[dtype])
        # clone: safetensors refuses tensors that share storage, and views may be non-contiguous.
        out[key] = value.contiguous().clone()
    return out


def save_backbone(state: dict[str, torch.Tensor], path: str | os.PathLike, *, dtype: str = "float32",
                  metadata: dict[str, str] | None = None) -> Path:
    """Write `state` to `path` atomically (temp file + rename) with format metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": "pt", "ssl_zoo_format": FORMAT_NAME, "ssl_zoo_format_version": FORMAT_VERSION,
            "dtype": dtype, **{k: str(v) for k, v in (metadata or {}).items()}}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(prepare_state(state, dtype), tmp_name, metadata=meta)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file (empty when it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise IntegrityError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                             f"export it again with `zoo export`") from e


def load_backbone(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (floating ones as fp32) and metadata of a file written by `save_backbone`."""
    from zoo.load import load_state_dict_file

    meta = read_metadata(path)
    version = meta.get("ssl_zoo_format_version")
    if version is not None and version != FORMAT_VERSION:
        raise IntegrityError(f"{path} has ssl-zoo weight format {version}, this version reads {FORMAT_VERSION}; "
                             f"upgrade ssl-zoo (pip install -U ssl-zoo) or export it again")
    state = load_state_dict_file(path)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta


def same_weights_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when two safetensors files hold the same metadata and bit-equal tensors of the same dtypes.

    safetensors writes its metadata dict in an unspecified order, so re-exporting unchanged weights can
    give different bytes (and sha256); export keeps the published file when this holds.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
            if (fa.metadata() or {}) != (fb.metadata() or {}) or set(fa.keys()) != set(fb.keys()):
                return False
            for key in fa.keys():
                ta, tb = fa.get_tensor(key), fb.get_tensor(key)
                if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(ta, tb):
                    return False
    except (SafetensorError, OSError):
        return False
    return True
