"""What ties weights to the recipe that made them: the recipe hash in trainer checkpoints and config.json.

Here in the library because the trainer writes it, `zoo export` checks it and `zoo convert` writes a
trainer-format checkpoint with it: one definition, so the three always agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def config_hash(recipe: dict[str, Any]) -> str:
    """sha256 of the resolved recipe (canonical JSON); goes into checkpoints and config.json."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
