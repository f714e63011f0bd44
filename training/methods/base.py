"""The one small interface the trainer drives. A method never imports the trainer."""

from __future__ import annotations

import copy
from typing import Any, ClassVar

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
