"""Method lookup by recipe name. Adding a method = one file here + one line in `_METHODS`."""

from __future__ import annotations

import importlib

from training.methods.base import SSLMethod

# recipe name -> (module in training.methods, class name)
_METHODS: dict[str, tuple[str, str]] = {
    "wmse": ("wmse", "WMSE"),
    "isd": ("isd", "ISD"),
    "simclr": ("simclr", "SimCLR"),
    "byol": ("byol", "BYOL"),
    "equimod-simclr": ("equimod", "EquiModSimCLR"),
    "equimod-byol": ("equimod", "EquiModBYOL"),
    "groco": ("groco", "GroCo"),
    "msbreg": ("msbreg", "MSBReg"),
}


def method_names() -> list[str]:
    return list(_METHODS)


def get_method_class(name: str) -> type[SSLMethod]:
    if name not in _METHODS:
        from zoo.errors import UnknownNameError, closest

        raise UnknownNameError(f"unknown method {name!r}; did you mean {closest(name, _METHODS)}? "
                               f"Known: {', '.join(_METHODS)}")
    module, cls = _METHODS[name]
    return getattr(importlib.import_module(f"training.methods.{module}"), cls)
