"""EquiMod (Devillers & Lefort, ICLR 2023): an equivariance module added to SimCLR or BYOL.

Per image: the un-augmented x0 and two views t1(x), t2(x) with raw augmentation parameter
vectors p1, p2 (`Views.params`, `[B, P]` each; P = 15 / 17 / 18 in the authors' layout, see
docs/methods/equimod.md §3). One backbone call on cat([x0, v1, v2]) (BN statistics include x0); then

    y = g(h) over all 3B rows,  y0 = y[:B],  y_t = [y_t1; y_t2] = y[B:]
    y_hat_t = u([ [y0; y0] ; pi(standardise([p1; p2])) ])
    L = L_base(views) + lmbd * NT-Xent_{t_y}(y_t, y_hat_t)      (positives y_t[i] <-> y_hat_t[i])

with g = Linear-BN-ReLU x2 + Linear + BN(affine=False) (2048-2048-128), pi = Linear(P, 128, no
bias) + BN(128), u = Linear(256, 128, no bias) + BN(128, affine=False). No stop-gradient in the
equivariant branch: gradients reach the x0 path. L_base is `SimCLR.invariance_loss` or
`BYOL.invariance_loss` on the view rows of the same backbone output; everything else (heads,
target network, EMA) is inherited from those classes.

Extra hyperparameters (recipe `method:`): `lmbd=1.0, t_y=0.2, param_dim` (15 for the SimCLR class,
18 for the BYOL class by default), `param_mean`, `param_std` (length-P lists; default zeros / ones,
i.e. no standardisation: recipes pass the authors' constants or ones measured on their own
augmentation pipeline), `eq_hidden=2048, eq_dim=128` (g's width and the y dimension).

Deliberate differences from the authors' code (ADevillers/EquiMod, branches `SimCLR+EquiMod` and
`BYOL+EquiMod`: `src/model.py::EquiMod`, `src/main.py::train_repr`), and why:
- The standardisation constants come from the recipe (`param_mean`, `param_std`) instead of being
  hard-coded per dataset in the training loop: a dataset the authors never used (Fashion-MNIST)
  needs its own measured constants, and the crop coordinates are in source-image pixels, so the
  authors' constants are only right for their image sizes. Defaults do nothing (0 / 1).
- y_t and y_hat_t are gathered across processes with `gather_with_grad` (each side separately,
  pairing preserved) and the loss is not multiplied by world_size; the authors gather without
  gradient, re-insert the local part and scale by world_size. Same gradient after DDP averaging.
- The equivariance NT-Xent runs in fp32 with autocast off (`nt_xent_loss`), not under AMP.
- g's width and the y dimension are hyperparameters (`eq_hidden`, `eq_dim`; defaults = the
  authors' 2048 and 128) so tests can build a small model; the authors' BYOL branch hard-codes
  2048-2048 and p_dim 18, here `param_dim` is a hyperparameter of both classes.
- The predictor u is always the authors' one-layer "one" variant and pi the "128" variant; their
  string-configured alternatives (`"none"`, deeper heads) are not exposed. (Their code always
  builds the predictor anyway, because of the `self.predictor_eq != "none"` quirk.)
- Inputs are checked: missing `params` / `original`, a parameter vector whose width is not
  `param_dim`, or an `original` of another shape than the views raise a ValueError naming the
  fix, instead of failing inside a matmul or `torch.cat`.
- x0 must have the views' shape (one backbone call); the authors' ImageNet x0 (Resize 256 +
  CenterCrop 224) already does.
- Logged: total, base and equivariance losses (and BYOL's momentum); the authors' extra monitors
  (feature norms, "eqgain") are left out.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from training.distributed import gather_with_grad
from training.methods.byol import BYOL
from training.methods.heads import mlp
from training.methods.simclr import SimCLR, check_two_views, nt_xent_loss
from training.views import Views


def standardize_params(params: torch.Tensor, mean: torch.Tensor | Sequence[float],
                       std: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """(params - mean) / std per column; params `[N, P]`, mean and std of length P.

    The result is floating point (fp32 for integer input) on params' device.
    """
    dtype = params.dtype if params.is_floating_point() else torch.float32
    mean_t = torch.as_tensor(mean, dtype=dtype, device=params.device)
    std_t = torch.as_tensor(std, dtype=dtype, device=params.device)
    if mean_t.shape != (params.shape[-1],) or std_t.shape != (params.shape[-1],):
        raise ValueError(f"standardize_params: params have {params.shape[-1]} columns but mean/std have shapes "
                         f"{tuple(mean_t.shape)} / {tuple(std_t.shape)}; they must be vectors of that length")
    return (params.to(dtype) - mean_t) / std_t


class EquivarianceHeads(nn.Module):
    """g (equivariant projector), pi (parameter projector), u (predictor) and the standardisation."""

    def __init__(self, feature_dim: int, param_dim: int, param_mean: Sequence[float] | None = None,
                 param_std: Sequence[float] | None = None, eq_hidden: int = 2048, eq_dim: int = 128):
        super().__init__()
        if param_dim < 1:
            raise ValueError(f"param_dim must be >= 1, got {param_dim}")
        mean = torch.zeros(param_dim) if param_mean is None else torch.as_tensor(param_mean, dtype=torch.float32)
        std = torch.ones(param_dim) if param_std is None else torch.as_tensor(param_std, dtype=torch.float32)
        for what, t in (("param_mean", mean), ("param_std", std)):
            if t.shape != (param_dim,):
                raise ValueError(f"EquiMod: {what} must be a list of param_dim={param_dim} numbers, got shape "
                                 f"{tuple(t.shape)}")
        if not bool((std > 0).all()):
            raise ValueError(f"EquiMod: param_std must be > 0 everywhere (a constant parameter has std 0: use 1 "
                             f"for it), got {std.tolist()}")
        self.param_dim = param_dim
        # Recipe constants, re-read on resume: kept out of state_dict.
        self.register_buffer("param_mean", mean, persistent=False)
        self.register_buffer("param_std", std, persistent=False)
        self.eq_projector = mlp((feature_dim, eq_hidden, eq_hidden, eq_dim), bias=False, last_bn=True,
                                last_bn_affine=False)  # g
        self.param_projector = mlp((param_dim, eq_dim), bias=False, last_bn=True)  # pi: Linear + BN (affine)
        self.eq_predictor = mlp((2 * eq_dim, eq_dim), bias=False, last_bn=True, last_bn_affine=False)  # u

    def forward(self, h: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h: backbone features of [x0; v1; v2] (`[3B, feat]`); params: raw `[p1; p2]` (`[2B, P]`).

        Returns (y_t, y_hat_t), both `[2B, eq_dim]`, row i of one the positive of row i of the other.
        """
        b = h.shape[0] // 3
        y = self.eq_projector(h)  # BN statistics over all 3B rows, as the authors
        y0, y_t = y[:b], y[b:]
        # Raw params may come as float64 / int from the augmentation code: match the heads' dtype.
        params = params.to(device=self.param_mean.device, dtype=self.param_mean.dtype)
        p = self.param_projector(standardize_params(params, self.param_mean, self.param_std))
        y_hat = self.eq_predictor(torch.cat([torch.cat([y0, y0]), p], dim=1))
        return y_t, y_hat


class _EquiModMixin:
    """The EquiMod forward, shared by both classes; the base method provides `invariance_loss`."""

    needs_params = True
    needs_original = True

    backbone: nn.Module
    name: str
    invariance_loss: Any

    def _build_equimod(self, lmbd: float, t_y: float, param_dim: int, param_mean: Sequence[float] | None,
                       param_std: Sequence[float] | None, eq_hidden: int, eq_dim: int) -> None:
        if t_y <= 0:
            raise ValueError(f"t_y must be > 0, got {t_y}")
        self.lmbd = float(lmbd)
        self.t_y = float(t_y)
        self.equivariance = EquivarianceHeads(self.backbone.feature_dim, param_dim, param_mean, param_std,
                                              eq_hidden, eq_dim)

    def _equimod_inputs(self, batch: Views, v1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x0 and cat([p1, p2]) after shape checks with errors that say what to fix."""
        if batch.original is None:
            raise ValueError(f"{self.name} needs the un-augmented image (Views.original); the data path must "
                             f"deliver it for methods with needs_original=True")
        if batch.params is None:
            raise ValueError(f"{self.name} needs the augmentation parameters (Views.params); the data path must "
                             f"deliver them for methods with needs_params=True")
        x0 = batch.original
        if x0.shape != v1.shape:
            raise ValueError(f"{self.name}: Views.original {tuple(x0.shape)} must have the views' shape "
                             f"{tuple(v1.shape)} to go through the backbone in the same call")
        if len(batch.params) != 2:
            raise ValueError(f"{self.name}: expected one parameter tensor per view (2), got {len(batch.params)}")
        p_dim = self.equivariance.param_dim
        for i, p in enumerate(batch.params):
            if p.dim() != 2 or p.shape[0] != v1.shape[0] or p.shape[1] != p_dim:
                raise ValueError(f"{self.name}: Views.params[{i}] has shape {tuple(p.shape)}, expected "
                                 f"[{v1.shape[0]}, {p_dim}] (batch, param_dim). The recipe's method.param_dim (and "
                                 f"param_mean/param_std) must match augment.params: crop 5 + jitter 10 = 15, "
                                 f"+ blur 2 = 17, + solarize 1 = 18")
        return x0, torch.cat(list(batch.params))

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        v1, v2 = check_two_views(batch, self.name)
        x0, params = self._equimod_inputs(batch, v1)
        b = v1.shape[0]
        h = self.backbone(torch.cat([x0, v1, v2]))  # one call: BN statistics include x0 (docs/methods/equimod.md §10)
        base_loss, logs = self.invariance_loss(h[b:], batch)
        y_t, y_hat = self.equivariance(h, params)
        eq_loss = nt_xent_loss(gather_with_grad(y_t), gather_with_grad(y_hat), self.t_y)
        loss = base_loss + self.lmbd * eq_loss
        return loss, {"loss": loss.detach(), **logs, "loss_equiv": eq_loss.detach()}


class EquiModSimCLR(_EquiModMixin, SimCLR):
    """SimCLR + EquiMod. hparams: SimCLR's (temperature = tau_z) + lmbd, t_y, param_dim (15),
    param_mean, param_std, eq_hidden, eq_dim (see the module docstring)."""

    name = "equimod-simclr"

    def __init__(self, backbone: nn.Module, temperature: float = 0.5, proj_hidden: int = 2048,
                 proj_dim: int = 128, lmbd: float = 1.0, t_y: float = 0.2, param_dim: int = 15,
                 param_mean: Sequence[float] | None = None, param_std: Sequence[float] | None = None,
                 eq_hidden: int = 2048, eq_dim: int = 128):
        super().__init__(backbone, temperature=temperature, proj_hidden=proj_hidden, proj_dim=proj_dim)
        self._build_equimod(lmbd, t_y, param_dim, param_mean, param_std, eq_hidden, eq_dim)


class EquiModBYOL(_EquiModMixin, BYOL):
    """BYOL + EquiMod. hparams: BYOL's + lmbd, t_y, param_dim (18), param_mean, param_std, eq_hidden,
    eq_dim. The EMA target (backbone + projector) sees the two views only, as the authors'."""

    name = "equimod-byol"

    def __init__(self, backbone: nn.Module, base_momentum: float = 0.996, proj_hidden: int = 4096,
                 proj_dim: int = 256, pred_hidden: int = 4096, lmbd: float = 1.0, t_y: float = 0.2,
                 param_dim: int = 18, param_mean: Sequence[float] | None = None,
                 param_std: Sequence[float] | None = None, eq_hidden: int = 2048, eq_dim: int = 128):
        super().__init__(backbone, base_momentum=base_momentum, proj_hidden=proj_hidden, proj_dim=proj_dim,
                         pred_hidden=pred_hidden)
        self._build_equimod(lmbd, t_y, param_dim, param_mean, param_std, eq_hidden, eq_dim)
