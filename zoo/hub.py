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


def hub_offline() -> bool:
    """Whether huggingface_hub is in offline mode (`HF_HUB_OFFLINE=1`), read at call time."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return True
    return bool(constants.HF_HUB_OFFLINE)


class HubUnreachableError(WeightsNotAvailableError):
    """Not in the Hugging Face cache, and the Hub is offline or unreachable."""


def hub_download(repo_id: str, filename: str, revision: str | None = None, force: bool = False) -> Path:
    """`hf_hub_download` (the cache when offline); failures become one-line WeightsNotAvailableError."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        from zoo.errors import MissingDependencyError

        raise MissingDependencyError("downloading weights from the Hub needs huggingface_hub; install it with: "
                                     "pip install huggingface_hub") from e
    from huggingface_hub.errors import (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, force_download=force))
    except LocalEntryNotFoundError as e:  # offline, or the Hub unreachable, and not in the cache
        raise HubUnreachableError(
            f"{where} is not in the Hugging Face cache and the Hub cannot be reached"
            f"{' (HF_HUB_OFFLINE=1)' if hub_offline() else ''}; connect once to download it, or pass "
            f"pretrained=PATH") from e
    except RevisionNotFoundError as e:  # before EntryNotFound: both are HTTP 404s
        raise WeightsNotAvailableError(f"revision {revision!r} does not exist in {repo_id}; pass a branch, tag or "
                                       f"commit sha listed at the repository") from e
    except (RepositoryNotFoundError, EntryNotFoundError) as e:
        raise WeightsNotAvailableError(f"{where} does not exist on the Hub; publish it with `zoo publish` or pass "
                                       f"pretrained=PATH") from e
    except Exception as e:  # HTTP and connection errors: report with the fix
        raise WeightsNotAvailableError(f"could not download {where} ({type(e).__name__}: "
                                       f"{str(e).splitlines()[0] if str(e) else ''}); retry, or pass "
                                       f"pretrained=PATH") from e


def download_verified(repo_id: str, filename: str, sha256: str | None, revision: str | None = None,
                      what: str = "the registry row") -> Path:
    """A Hub file whose sha256 equals `sha256` (unchecked when None); refetched once if the cached copy differs."""
    path = hub_download(repo_id, filename, revision)
    if not sha256 or sha256_file(path) == sha256:
        return path
    where = f"{repo_id}/{filename}" + (f"@{revision}" if revision else "")
    if hub_offline():
        raise IntegrityError(
            f"the cached {where} ({path}) is corrupt: sha256 {sha256_file(path)[:12]}... differs from {what}'s "
            f"{sha256[:12]}...; unset HF_HUB_OFFLINE to download it again, or delete it from the cache")
    path = hub_download(repo_id, filename, revision, force=True)
    actual = sha256_file(path)
    if actual != sha256:
        raise IntegrityError(
            f"{where} downloaded from the Hub has sha256 {actual[:12]}..., not {what}'s {sha256[:12]}... (refused); "
            f"the published file is not the exported one: re-publish it with `zoo publish`, or pass pretrained=PATH")
    return path


def resolve_verified_weights(spec: ModelSpec, revision: str | None = None) -> tuple[Path, ModelSpec]:
    """Weights of `spec`, sha256-checked, and the row they belong to.

    Without `revision`: model_cards/ -> HF cache -> Hub, checked against the
    registry row; a corrupt cached copy is downloaded again once when online. With `revision` (branch,
    tag or commit sha of `spec.hub_repo`): config.json and the weights of that revision, the weights
    checked against that config.json's sha256 (a pinned commit may predate the registry row).
    """
    if revision is not None:
        import json

        config_path = hub_download(spec.hub_repo, "config.json", revision)
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"config.json of {spec.hub_repo}@{revision} is not valid JSON ({e}); re-publish "
                                 f"it with `zoo publish`") from e
        pinned = ModelSpec.from_dict({**spec.to_dict(), **config})
        if pinned.arch != spec.arch:
            raise IntegrityError(f"{spec.hub_repo}@{revision} holds arch {pinned.arch!r}, the registry row "
                                 f"{spec.name} is {spec.arch!r}; pick the revision of this model")
        expected = pinned.sha256 or spec.sha256
        weights = download_verified(spec.hub_repo, pinned.weights_file, expected, revision,
                                    what=f"config.json of {spec.hub_repo}@{revision}")
        return weights, pinned
    shipped = model_cards_dir() / spec.name / spec.weights_file
    if shipped.exists():
        verify_sha256(shipped, spec.sha256, f"the registry row of {spec.name}")
        return shipped, spec
    cached = _from_hf_cache(spec)
    if cached is not None and (not spec.sha256 or sha256_file(cached) == spec.sha256):
        return cached, spec
    try:
        return download_verified(spec.hub_repo, spec.weights_file, spec.sha256,
                                 what=f"the registry row of {spec.name}"), spec
    except HubUnreachableError as e:
        raise WeightsNotAvailableError(
            f"weights of {spec.name} are not in {shipped.parent}, the Hugging Face cache, or reachable on the "
            f"Hub ({spec.hub_repo}); connect once to download them, pass pretrained=PATH, or train them with "
            f"`zoo train {spec.recipe}`") from e
