"""Errors a user meets first. Each message is one line that names the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class ZooError(Exception):
    """Base class of every error ssl-zoo raises on purpose."""


class UnknownNameError(ZooError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message with quotes
        return str(self.args[0])


class WeightsNotAvailableError(ZooError, FileNotFoundError):
    pass


class CheckpointMismatchError(ZooError, ValueError):
    pass


class IntegrityError(ZooError, ValueError):
    pass


class MissingDependencyError(ZooError, ImportError):
    pass


# Raised by every stage of `zoo.embed` (sources, runners, embed, shards), so it lives below all of them.
class EmbedError(ZooError, ValueError):
    """Bad arguments to `embed` / `embed_to_dir` (one line, names the fix)."""


# Raised by `zoo.index` and its files (`zoo.index_io`).
class IndexUsageError(ZooError, ValueError):
    """A wrong call on an index (dimension, NaN, k, ids...): one line that names the fix."""


def closest(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """The closest candidate names, quoted and comma-separated, for 'did you mean' messages."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        found = [c for c in candidates if c.startswith(name.split(".")[0][:4])][:n]
    return ", ".join(repr(f) for f in found) if found else "(no close match)"


def require(module: str, extra: str, feature: str):
    """Import an optional dependency or fail with the pip extra that installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"{feature} needs the '{module}' package; install it with: pip install 'ssl-zoo[{extra}]'"
        ) from e


# What a command prints as one `error:` line (exit status 2) instead of a traceback: ssl-zoo's own errors
# and the built-in ones whose messages our code writes for the user (bad recipe keys, missing files).
ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (ZooError, FileNotFoundError, ValueError, KeyError)
