"""Ids and arguments of `zoo.Index`: what `add` and `search` accept, checked before FAISS sees anything.

Ids are ints (within int64, which is how search results and `ids.npy` hold them) or strings, unique
across the whole index: a duplicate would make `search` results and `labels_of` ambiguous.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from zoo.errors import IndexUsageError

INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def normalized_ids(ids: Any) -> list[Any]:
    """`ids` as a list of Python ints and strs; one-line IndexUsageError for anything else."""
    if isinstance(ids, (str, bytes, os.PathLike)):  # iterating would split it into characters
        raise IndexUsageError(f"ids must be a sequence of ids (one per vector), got a single "
                              f"{type(ids).__name__} {str(ids)[:40]!r}; pass [{str(ids)[:40]!r}] for one vector")
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        ids = ids.tolist()
    out = []
    for i in ids:
        if isinstance(i, np.integer):
            i = int(i)
        elif isinstance(i, os.PathLike):
            i = str(i)
        elif not isinstance(i, (int, str)) or isinstance(i, bool):
            raise IndexUsageError(f"ids must be ints or strings, got a {type(i).__name__} ({i!r})")
        if isinstance(i, int) and not INT64_MIN <= i <= INT64_MAX:
            raise IndexUsageError(f"id {i} does not fit in int64 (search returns int ids as int64); use ids "
                                  f"within +-2**63 or strings")
        out.append(i)
    return out


def check_unique(new: list[Any], existing: set[Any]) -> None:
    """Refuse an id that repeats within `new` or is already in the index (`existing`), naming it."""
    seen: set[Any] = set()
    for i in new:
        if i in existing:
            raise IndexUsageError(f"id {i!r} is already in the index; ids must be unique (remove it from this add, "
                                  f"or give it another id)")
        if i in seen:
            raise IndexUsageError(f"id {i!r} appears twice in this add; ids must be unique")
        seen.add(i)


def check_k(k: Any) -> int:
    """`k` of `search`: a positive int (not a bool, which Python counts as an int)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise IndexUsageError(f"k must be a positive int, got {k!r}")
    return int(k)

