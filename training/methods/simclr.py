"""SimCLR (Chen et al., ICML 2020) as the EquiMod authors re-implemented it (`SimCLR+EquiMod` branch).

Loss: NT-Xent over the 2N projected views of N images (`nt_xent_loss`); heads: a 3-layer bias-free
projector with BatchNorm, the last BN without affine parameters. Hyperparameters (recipe `method:`):
`temperature=0.5, proj_hidden=2048, proj_dim=128`.

Deliberate differences from the authors' code (ADevillers/EquiMod, `src/loss.py::NTXentLoss`,
`src/model.py`, `src/main.py`), and why:
- Self-similarity is removed with `masked_fill(-inf)` instead of subtracting 1e8 from the
  diagonal: the exclusion is exact and independent of the temperature; the value differs from the
  authors' only below fp32 resolution (exp(-1e8) = 0 there as well).
- The loss runs in fp32 with autocast disabled (float64 stays float64). The authors let the
  matmul run in fp16 under AMP and rely on the fp32 mask to promote it; doing the whole
  normalise-matmul-softmax in fp32 removes the dependence on which kernels autocast picks.
- Negatives from other processes: `gather_with_grad` (a differentiable all-gather) on each side,
  and no `x world_size` factor. The authors gather without gradient, re-insert the local part and
  multiply the loss by world_size; both give the single-process gradient after DDP's averaging
  (see `training.distributed.gather_with_grad`).
- The loss takes the two sides (z1, z2) instead of one concatenated tensor: the pairing i <-> i+N
  is explicit and survives the per-side gather (each gathered side keeps rank order).
- No cache of masks/labels per batch size: built per call (negligible next to the matmul).
- The backbone is the one the trainer passes (`zoo.backbones.create_backbone`); the authors build
  torchvision ResNets with `zero_init_residual=True`, so a recipe reproducing them should ask for
  it. SyncBatchNorm conversion is the trainer's job, not the method's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_with_grad
from training.methods.base import SSLMethod, loss_dtype
from training.methods.heads import mlp
from training.views import Views



def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) over N positive pairs.

    With u = [z1; z2] (2N rows), s_ik = cos(u_i, u_k) and pos(i) = (i + N) mod 2N:

        L = 1/(2N) * sum_i  -log( exp(s_{i,pos(i)} / t) / sum_{k != i} exp(s_ik / t) )

    i.e. the mean cross-entropy of the 2N rows of the similarity matrix / t, with the diagonal
    (self-similarity) excluded and the target column pos(i). Every other row, of both views, is a
    negative. Computed in fp32 (float64 kept) with autocast off, so a bf16/fp16 input under
    autocast still gives an fp32 loss. z1, z2: `[N, d]`. To use negatives from all processes,
    pass `gather_with_grad(z1), gather_with_grad(z2)`.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent_loss expects two [N, d] tensors of the same shape, got {tuple(z1.shape)} "
                         f"and {tuple(z2.shape)}")
    n = z1.shape[0]
    with torch.autocast(device_type=z1.device.type, enabled=False):
        dtype = loss_dtype(z1)
        u = F.normalize(torch.cat([z1, z2]).to(dtype), dim=1)
        logits = (u @ u.T) / temperature
        self_mask = torch.eye(2 * n, dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(self_mask, float("-inf"))  # exp(-inf) = 0: self never in the denominator
        targets = torch.arange(2 * n, device=u.device).roll(n)  # row i's positive: (i + N) mod 2N
        return F.cross_entropy(logits, targets)


def simclr_projector(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(affine=False); every Linear bias-free (BN follows)."""
    return mlp((in_dim, hidden, hidden, out_dim), bias=False, batch_norm=True, last_bn=True, last_bn_affine=False)


def check_two_views(batch: Views, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The two augmented views of a two-view method, with a clear error otherwise."""
    if len(batch.views) != 2:
        raise ValueError(f"{method} takes exactly 2 views per image, got {len(batch.views)}; "
                         f"check the recipe's augmentation section")
    v1, v2 = batch.views
    if v1.shape != v2.shape:
        raise ValueError(f"{method}: the two views must have the same shape to share one backbone call, got "
                         f"{tuple(v1.shape)} and {tuple(v2.shape)}")
    return v1, v2


class SimCLR(SSLMethod):
    """SimCLR: one backbone call on cat(views), projector, NT-Xent over all processes' pairs.

    hparams: temperature (0.5, the EquiMod CIFAR-10 recipe; 0.2 for their ImageNet one),
    proj_hidden (2048), proj_dim (128).
    """

    name = "simclr"

    def __init__(self, backbone: nn.Module, temperature: float = 0.5, proj_hidden: int = 2048, proj_dim: int = 128):
        super().__init__(backbone)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.projector = simclr_projector(backbone.feature_dim, proj_hidden, proj_dim)

    def invariance_loss(self, h: torch.Tensor, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        """SimCLR's loss from backbone features `h` of the two views (`[2B, feat]`, view 1 rows first).

        `batch` is unused here (BYOL's target needs the images); EquiMod calls this with the view
        rows of its three-part backbone output.
        """
        z1, z2 = self.projector(h).chunk(2)
        loss = nt_xent_loss(gather_with_grad(z1), gather_with_grad(z2), self.temperature)
        return loss, {"loss_simclr": loss.detach()}

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        v1, v2 = check_two_views(batch, self.name)
        h = self.backbone(torch.cat([v1, v2]))  # one call: BN statistics over both views, as the authors
        loss, logs = self.invariance_loss(h, batch)
        return loss, {"loss": loss.detach(), **logs}
