"""Which file and class implement each method of the registry (`zoo.registry.METHOD_ROWS`).

Adding a method = its row in the registry (name, display name, paper) + one file here + one line in
`IMPLEMENTATIONS`; `tests/test_trainer.py` checks the two name the same methods.
"""

from __future__ import annotations

import importlib

from training.methods.base import SSLMethod
from zoo.registry import get_method

# registry method name -> (module in training.methods, class name)
IMPLEMENTATIONS: dict[str, tuple[str, str]] = {
    "wmse": ("wmse", "WMSE"),
    "isd": ("isd", "ISD"),
    "simclr": ("simclr", "SimCLR"),
    "byol": ("byol", "BYOL"),
    "equimod-simclr": ("equimod", "EquiModSimCLR"),
    "equimod-byol": ("equimod", "EquiModBYOL"),
    "groco": ("groco", "GroCo"),
    "msbreg": ("msbreg", "MSBReg"),
}


def get_method_class(name: str) -> type[SSLMethod]:
    """The class implementing a registry method; an unknown name raises the registry's one-line error."""
    get_method(name)
    module, cls = IMPLEMENTATIONS[name]
    return getattr(importlib.import_module(f"training.methods.{module}"), cls)
