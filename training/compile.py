"""`train.compile`: torch.compile a method's networks in place, its losses left eager.

A recipe's `train.compile` is `false` (eager, the default), `true` (torch.compile's default mode) or a mode
name. The small Fashion-MNIST nets are launch-bound on a GPU; compiling fuses their kernels, and
"reduce-overhead" adds CUDA graphs on top.

Why the networks and not the whole method: every direct child of an `SSLMethod` is a network (backbone,
projector, predictor, momentum copies, EquiMod's heads), while the losses are functions called in the
method's `forward`. Compiling the children alone keeps whitening, Cholesky, sorting networks and
low-temperature softmax out of the compiler, in the fp32 they choose (`no_autocast`). `nn.Module.compile`
compiles in place, so `state_dict()` keys are unchanged: checkpoints move between compiled and eager runs,
and `zoo train --resume DIR --set train.compile=...` may switch it (see `RUN_ONLY_KEYS`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.errors import ZooError

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Recipe keys that change how a run executes, not what it computes: a resumed run may change them.
RUN_ONLY_KEYS = (("train", "compile"),)
# torch.compile's backend. Tests set "eager" to check the plumbing without inductor's minutes of codegen.
BACKEND = "inductor"


def compile_mode(value: Any) -> str | None:
    """The recipe's `train.compile` as a torch.compile mode; None when off. Anything else: a one-line error."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ZooError(f"train.compile is {value!r}; set it to false, true or one of {', '.join(COMPILE_MODES)}")


def compile_networks(method: nn.Module, mode: str) -> list[str]:
    """Compile each direct child of `method` in place (`nn.Module.compile`) and return their names."""
    names = []
    for name, child in method.named_children():
        if BACKEND == "inductor":
            child.compile(mode=mode)
        else:  # other backends take no inductor mode
            child.compile(backend=BACKEND)
        names.append(name)
    return names


def without_run_only_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    """`recipe` minus `RUN_ONLY_KEYS`: what a resumed run must share with the run it continues."""
    out = {section: dict(body) if isinstance(body, dict) else body for section, body in recipe.items()}
    for section, key in RUN_ONLY_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out
