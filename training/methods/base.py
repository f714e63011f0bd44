"""The one small interface the trainer drives. A method never imports the trainer."""

from __future__ import annotations

import copy
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from training.views import Views


class SSLMethod(nn.Module):
    """Base class of every method (one subclass per file in `training/methods/`).

    Contract:
    - `__init__(backbone, **hparams)`: hparams are the recipe's `method:` section minus `name`.
    - `forward(batch: Views) -> (loss, logs)`: loss is a scalar tensor; logs a dict of floats or
      0-dim tensors (detached by the trainer) such as the loss terms.
    - `after_optimizer_step(step, total_steps)`: momentum/EMA updates (optional).
    - `self.backbone`: the network to evaluate and export.
    - Everything a resumed run needs (teacher, queue) is a parameter or buffer, so it is in
      `state_dict()`; randomness comes from `batch.generator`, never the global RNG.
    """

    name: ClassVar[str] = ""
    # What the data path must deliver: parameter vectors / the un-augmented image (EquiMod).
    needs_params: ClassVar[bool] = False
    needs_original: ClassVar[bool] = False

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    @classmethod
    def from_config(cls, backbone: nn.Module, config: dict[str, Any]) -> "SSLMethod":
        config = {k: v for k, v in config.items() if k != "name"}
        try:
            return cls(backbone, **config)
        except TypeError as e:
            raise ValueError(f"bad `method:` section for {cls.name}: {e}; see the method's docstring for its "
                             f"hyperparameters") from e

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step (EMA teachers update here)."""

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim


def loss_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 kept (gradcheck): whitening, low-temperature softmax,
    SVD and sorting networks lose too much in half precision."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def no_autocast(device: torch.device):
    """A context with autocast off on `device`, so a loss runs in the dtype it chooses."""
    device_type = device.type if torch.amp.is_autocast_available(device.type) else "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def forward_by_size(images: list[torch.Tensor], net: Callable[[torch.Tensor], Any]) -> list[Any]:
    """`net` applied to every view, with one call per distinct crop size (views of equal size are
    concatenated, so BatchNorm sees them together, and multi-crop costs one call per size).

    `net` returns a tensor or a tuple of tensors; each view gets its rows of each, order preserved.
    """
    out: list[Any] = [None] * len(images)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, x in enumerate(images):
        groups.setdefault(tuple(x.shape[1:]), []).append(i)
    for idx in groups.values():
        y = net(torch.cat([images[i] for i in idx], dim=0))
        if isinstance(y, tuple):
            parts = [t.chunk(len(idx), dim=0) for t in y]
            for k, i in enumerate(idx):
                out[i] = tuple(p[k] for p in parts)
        else:
            for i, chunk in zip(idx, y.chunk(len(idx), dim=0)):
                out[i] = chunk
    return out


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy for EMA targets/teachers (no gradients, kept in train mode by the owner)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online, parameters and (copied) buffers."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def cosine_momentum(base: float, step: int, total_steps: int) -> float:
    """BYOL's schedule: 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, from base to 1."""
    import math

    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(total_steps, 1)) + 1.0) / 2.0
