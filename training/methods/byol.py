"""BYOL (Grill et al., NeurIPS 2020) as the EquiMod authors re-implemented it (`BYOL+EquiMod` branch).

Online network: backbone -> projector -> predictor; target network: an EMA copy of backbone +
projector (`momentum_copy`), never trained by gradient. Loss: `byol_loss(p1, z'2) + byol_loss(p2,
z'1)`, the two symmetric terms summed. Hyperparameters (recipe `method:`): `base_momentum=0.996,
proj_hidden=4096, proj_dim=256, pred_hidden=4096`.

Deliberate differences from the authors' code (ADevillers/EquiMod `BYOL+EquiMod`: `src/model.py::
MomentumResNet`, `src/loss.py::BYOLLoss`, `src/main.py::train_repr`), and why:
- When the EMA happens: the authors update the target at the start of iteration k with
  tau(k) = 1 - (1 - base)(cos(pi k / K) + 1) / 2; here the trainer calls `after_optimizer_step(k,
  K)` after the k-th (0-based) optimiser step and the update uses tau(k + 1), k + 1 being the number
  of optimiser steps taken. That is the same sequence of target weights as the authors' (their
  update at iteration k + 1 sees the same online weights), and the last update uses tau(K) = 1.
- `ema_update` also copies the online BN buffers into the target; the authors average parameters
  only and leave the target's running statistics at their initial values. Training is unaffected
  (the target runs in train mode, on batch statistics), but the target becomes usable in eval mode.
- `byol_loss` runs in fp32 with autocast off (float64 kept) and detaches z itself; the authors
  detach the target output in the momentum model and compute the cosine under AMP.
- Loss = sum of the two per-direction means instead of the authors' `mean over 2B rows x 2`:
  the same number, written as the two symmetric terms.
- The view swap (p1 with the target of view 2) is indexed explicitly instead of rolling the target
  output by B rows.
- The target is part of the method (`target_backbone`, `target_projector`), so it is in
  `state_dict()` and a resumed run continues it; the authors keep a separate `momentum_model`.
- Heads follow the EquiMod BYOL branch: hidden Linear without bias (BN follows), output Linear with
  bias; the original BYOL MLP also has a (redundant) hidden bias.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.base import SSLMethod, cosine_momentum, ema_update, momentum_copy
from training.methods.heads import mlp
from training.methods.simclr import check_two_views
from training.views import Views


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """mean_i (2 - 2 cos(p_i, z_i)) = mean_i ||p_i/|p_i| - z_i/|z_i|||^2, z detached (target branch).

    p, z: `[N, d]`. Values: identical rows 0, orthogonal 2, opposite 4. Computed in fp32 (float64
    kept) with autocast off.
    """
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(f"byol_loss expects two [N, d] tensors of the same shape, got {tuple(p.shape)} and "
                         f"{tuple(z.shape)}")
    with torch.autocast(device_type=p.device.type, enabled=False):
        dtype = torch.promote_types(p.dtype, torch.float32)
        cos = F.cosine_similarity(p.to(dtype), z.detach().to(dtype), dim=1)
        return (2.0 - 2.0 * cos).mean()


class BYOL(SSLMethod):
    """BYOL with an EMA target (backbone + projector) on a cosine momentum schedule base -> 1.

    hparams: base_momentum (0.996), proj_hidden (4096), proj_dim (256), pred_hidden (4096).
    """

    name = "byol"

    def __init__(self, backbone: nn.Module, base_momentum: float = 0.996, proj_hidden: int = 4096,
                 proj_dim: int = 256, pred_hidden: int = 4096):
        super().__init__(backbone)
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"base_momentum must be in [0, 1], got {base_momentum}")
        self.base_momentum = float(base_momentum)
        self.projector = mlp((backbone.feature_dim, proj_hidden, proj_dim), bias=False, last_bias=True)
        self.predictor = mlp((proj_dim, pred_hidden, proj_dim), bias=False, last_bias=True)
        # Copies made after the online heads exist, so target and online start identical.
        self.target_backbone = momentum_copy(self.backbone)
        self.target_projector = momentum_copy(self.projector)

    def momentum_at(self, steps_done: int, total_steps: int) -> float:
        """EMA momentum after `steps_done` optimiser steps: base at 0, 1 at total_steps."""
        return cosine_momentum(self.base_momentum, steps_done, total_steps)

    def invariance_loss(self, h: torch.Tensor, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        """BYOL's loss from online backbone features `h` (`[2B, feat]`, view 1 first) and the batch.

        The target sees the two views only, in one call (its BN statistics over 2B images, as the
        authors' momentum model).
        """
        p1, p2 = self.predictor(self.projector(h)).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_backbone(torch.cat(batch.views))).chunk(2)
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        # The momentum of the last EMA update this target went through (after batch.step steps).
        return loss, {"loss_byol": loss.detach(), "momentum": self.momentum_at(batch.step, batch.total_steps)}

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        v1, v2 = check_two_views(batch, self.name)
        h = self.backbone(torch.cat([v1, v2]))
        loss, logs = self.invariance_loss(h, batch)
        return loss, {"loss": loss.detach(), **logs}

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = self.momentum_at(step + 1, total_steps)  # step + 1 optimiser steps done (see module docstring)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)
