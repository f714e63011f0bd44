"""Where weights live: explicit path -> `model_cards/<name>/` -> Hugging Face cache -> Hub download.

huggingface_hub is imported lazily, so a user who only needs a backbone never pays for it, and the
package imports without it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from zoo.errors import IntegrityError, WeightsNotAvailableError
from zoo.registry import ModelSpec


def model_cards_dir() -> Path:
    """The repository's `model_cards/` (a clone or editable install), or `$SSL_ZOO_MODEL_CARDS`."""
    env = os.environ.get("SSL_ZOO_MODEL_CARDS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "model_cards"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_sha256(path: str | os.PathLike, expected: str | None, what: str) -> None:
    if not expected:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{path} is corrupt or was changed: sha256 {actual[:12]}... differs from {what}'s "
                             f"{expected[:12]}...; delete the file and download or export it again")


def _from_hf_cache(spec: ModelSpec) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(spec.hub_repo, spec.weights_file)
    return Path(hit) if isinstance(hit, str) else None


def _from_hub(spec: ModelSpec) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(spec.hub_repo, spec.weights_file))
    except LocalEntryNotFoundError:  # offline (HF_HUB_OFFLINE=1 or no network) and not cached
        return None
    except Exception as e:  # repo missing on the Hub, HTTP errors: report below with the fix
        raise WeightsNotAvailableError(
            f"could not download {spec.hub_repo}/{spec.weights_file} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            f"pass pretrained=PATH to a local copy or train it with `zoo train {spec.recipe}`") from e


def resolve_weights(spec: ModelSpec) -> Path:
    """Path of the registry weights of `spec`, trying the local places before the network."""
    shipped = model_cards_dir() / spec.name / spec.weights_file
    if shipped.exists():
        return shipped
    for finder in (_from_hf_cache, _from_hub):
        found = finder(spec)
        if found is not None:
            return found
    raise WeightsNotAvailableError(
        f"weights of {spec.name} are not in {shipped.parent}, the Hugging Face cache, or reachable on the Hub "
        f"({spec.hub_repo}); connect once to download them, pass pretrained=PATH, or train them with "
        f"`zoo train {spec.recipe}`")
