"""W-MSE (Ermolov, Siarohin, Sangineto, Sebe; ICML 2021): whitening + MSE of normalised embeddings.

Reference: htdt/self-supervised @ d9662c8 (`methods/w_mse.py`, `methods/whitening.py`,
`methods/norm_mse.py`, `model.py`), as described in `docs/methods/wmse.md`.
Written from that description; nothing is copied.

Loss (`wmse_loss`): the d projected views of N images are cut, by one random permutation shared
by all views, into sub-batches of `w_size` images; every view's sub-batch is Cholesky-whitened on
its own (`whiten`), and the loss is the mean over view pairs of `2 - 2 mean cos`. No
stop-gradient, no target network, no predictor. Hyperparameters (recipe `method:`), defaults
from the authors' CIFAR recipe: `emb=64, hidden=1024, w_size=128, w_iter=1, w_eps=0.0`.

Deliberate differences from the authors' code, and why:
1. All sub-batches of all views and all `w_iter` iterations are whitened by ONE batched
   Cholesky / triangular solve on a `[w_iter*d*S, w_size, emb]` tensor; the authors loop in Python
   over iterations, views and sub-batches. Same numbers; on GPU small Cholesky calls are
   launch-bound (docs/methods/wmse.md §9).
2. Whitening runs in fp32 (fp64 kept) with autocast disabled, and the normalise/cosine part of the
   loss as well. The authors train in fp32 only; under AMP, Cholesky of an fp16/bf16 covariance
   is unsupported or loses positive-definiteness (docs/methods/wmse.md §9, solo-learn does the same cast).
3. A failed Cholesky (`cholesky_ex` info != 0, or a non-finite factor) raises `WhiteningError`
   naming the fixes; the authors' `torch.linalg.cholesky` raises a bare LinAlgError (older torch
   could return NaN). `w_size >= 2*emb` (the author's rule, issue #7) and `N % w_size == 0` are
   checked with one-line errors instead of failing inside `.view`/Cholesky.
4. The views' embeddings are all-gathered across processes with a differentiable gather BEFORE
   the partition, so `w_size` counts images of the global batch (the authors run single-process
   DataParallel and do not gather; under DDP without the gather every rank would need a local
   batch >= w_size). The partition is drawn from `batch.generator`, seeded identically on every
   rank, so all ranks whiten the same sub-batches; the authors use the global RNG.
5. ONE backbone call on the concatenated views (BatchNorm statistics over all d*N images); the
   authors call the backbone once per view (`cat([model(x) for x in samples])`, per-view backbone
   BN statistics; their projector BN already sees all views). One call is the zoo's convention
   and is cheaper on CPU.
6. `W = L^-1` is obtained with `torch.linalg.solve_triangular(L, I)` as the current reference does
   (the older `torch.triangular_solve` is identical); the whitened output is `(x - mu) W^T` as a
   batched matmul instead of their 1x1 `conv2d` (the same product).
7. Only the normalised loss (`norm_mse_loss`, the authors' default) is provided; their `--no_norm`
   switch (plain MSE of whitened vectors) appears in none of the README recipes.
No stop-gradient is added (solo-learn's `z2.detach()` changes the gradient, docs/methods/wmse.md §2, §9).

On invariance (the loss, not a change from the authors): Cholesky whitening maps `x A + b` to the
whitened `x` when `A` is upper triangular (`chol(A^T S A) = A^T chol(S) D`, D a sign matrix shared by
the views), so the loss is
invariant to a shared upper-triangular affine map of a sub-batch's embeddings. For a general
invertible `A` each view comes out rotated by its own orthogonal factor (it depends on that view's
covariance), so the cosines between views, and the loss, change: no Cholesky-whitened loss (the
authors' included) is invariant to every affine map. The tests pin the triangular invariance and
that a rotation does change the loss.
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_with_grad
from training.methods.base import SSLMethod, loss_dtype, no_autocast
from training.methods.heads import mlp
from training.views import Views
from zoo.errors import ZooError


class WhiteningError(ZooError, FloatingPointError):
    """The covariance of a sub-batch is not positive definite: Cholesky whitening is impossible."""




def whiten(x: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Cholesky whitening of one sub-batch `[n, d]` or a batch of sub-batches `[S, n, d]`.

    Per sub-batch: mu = mean of the rows, Sigma = (x - mu)^T (x - mu) / (n - 1) (unbiased),
    Sigma_eps = (1 - eps) Sigma + eps I, L = cholesky(Sigma_eps) (lower), W = L^-1, and the output
    is (x - mu) W^T, whose unbiased covariance is the identity (for eps = 0). Computed with
    autocast disabled in fp32 whatever the input dtype (fp16/bf16/fp32), or in fp64 for fp64 input;
    the output has the computation dtype.
    Raises `WhiteningError` when a covariance is not positive definite (never returns NaN).
    """
    if x.dim() not in (2, 3):
        raise ValueError(f"whiten expects [n, d] or [S, n, d], got shape {tuple(x.shape)}")
    n, d = x.shape[-2], x.shape[-1]
    if n < 2:
        raise ValueError(f"whiten needs at least 2 rows per sub-batch for an unbiased covariance, got {n}")
    with no_autocast(x.device):
        x = x.to(loss_dtype(x))
        xc = x - x.mean(dim=-2, keepdim=True)
        cov = xc.mT @ xc / (n - 1)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        if eps:
            cov = (1.0 - eps) * cov + eps * eye
        chol, info = torch.linalg.cholesky_ex(cov)
        # One host sync for both checks; a NaN input can give info == 0 with a NaN factor.
        bad = (info != 0) | ~torch.isfinite(chol).flatten(-2).all(-1)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            n_total = bad.numel()
            raise WhiteningError(
                f"W-MSE whitening failed: the {d}x{d} covariance of {n_bad}/{n_total} sub-batch(es) of {n} "
                f"embeddings is not positive definite (eps={eps}), which means the embeddings (nearly) collapsed "
                f"or the sub-batch is too small; raise w_size (>= 2*emb), set w_eps > 0 (e.g. 1e-4) or lower the lr")
        w = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # W = L^-1
        return xc @ w.mT


def _draw_perms(n: int, w_iter: int, perms: torch.Tensor | None, generator: torch.Generator | None,
                device: torch.device) -> torch.Tensor:
    if perms is None:
        if generator is None:  # a pure function of its arguments: no draw from the global RNG
            raise ValueError("wmse_loss needs perms=[w_iter, N] or generator=torch.Generator(): it draws no "
                             "randomness from the global RNG")
        # Drawn one after another, so `perms` built the same way reproduces this path exactly.
        perms = torch.stack([torch.randperm(n, generator=generator) for _ in range(w_iter)])
    elif tuple(perms.shape) != (w_iter, n):
        raise ValueError(f"perms must be [w_iter, N] = [{w_iter}, {n}], got {tuple(perms.shape)}")
    return perms.to(device=device, dtype=torch.long)


def wmse_loss(views: Sequence[torch.Tensor], w_size: int, w_iter: int = 1, eps: float = 0.0,
              perms: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """W-MSE loss of d >= 2 views `[N, emb]` (row n of every view = image n).

    For iteration t = 1..T (T = w_iter) a permutation pi_t of the N images is cut into S = N / w_size
    consecutive sub-batches B_{t,s} (the same for every view). With whiten_{t,s,i} the Cholesky
    whitening of view i's embeddings restricted to B_{t,s} (see `whiten`), z = whiten(v) / |whiten(v)|:

        L = 1/(T * P) * sum_t sum_{i<j} [ 2 - 2/N * sum_s sum_{n in B_{t,s}} <z^{t,s}_i[n], z^{t,s}_j[n]> ]

    with P = d(d-1)/2 view pairs, i.e. the mean over iterations and pairs of the MSE of the
    normalised whitened vectors. Gradients flow through the whitening (no stop-gradient).

    perms: `[w_iter, N]` integer permutations to use (tests); otherwise drawn with
    `torch.randperm(N, generator=generator)`, iteration after iteration (one of the two is required). All sub-batches are
    whitened in one batched Cholesky. Runs in fp32 (fp64 kept) with autocast disabled.
    """
    d = len(views)
    if d < 2:
        raise ValueError(f"W-MSE needs at least 2 views per image, got {d}")
    shape = tuple(views[0].shape)
    if len(shape) != 2 or any(tuple(v.shape) != shape for v in views):
        raise ValueError(f"W-MSE views must all be [N, emb] with the same shape, got {[tuple(v.shape) for v in views]}")
    n, emb = shape
    if w_iter < 1:
        raise ValueError(f"w_iter must be >= 1, got {w_iter}")
    if w_size < 2 * emb:
        raise ValueError(f"w_size={w_size} < 2*emb={2 * emb}: the sub-batch covariance would be singular or too noisy "
                         f"to whiten; raise w_size or lower emb")
    if n % w_size != 0:
        raise ValueError(f"the (global) batch of {n} images is not a multiple of w_size={w_size}; choose a batch size "
                         f"that is a multiple of w_size (or a w_size dividing it, still >= 2*emb={2 * emb})")
    device = views[0].device
    perms = _draw_perms(n, w_iter, perms, generator, device)
    with no_autocast(device):
        h = torch.stack([v.to(loss_dtype(v)) for v in views])  # [d, N, emb]
        idx = perms.reshape(-1, w_size)  # [T*S, w]: every sub-batch of every iteration
        sub = h[:, idx]  # [d, T*S, w, emb]
        z = whiten(sub.reshape(-1, w_size, emb), eps).reshape(sub.shape)
        z = F.normalize(z, dim=-1)
        i, j = torch.triu_indices(d, d, offset=1, device=device)
        cos = (z[i] * z[j]).sum(-1)  # [P, T*S, w]
        # Every (pair, iteration) holds the same N rows, so one mean = mean over pairs and iterations.
        return (2.0 - 2.0 * cos).mean()


class WMSE(SSLMethod):
    """W-MSE: backbone -> projector (Linear-BN-ReLU-Linear) -> `wmse_loss` over the global batch.

    Hyperparameters (recipe `method:`): `emb` (64; 128 for STL-10 / Tiny / ImageNet-100), `hidden`
    (1024), `w_size` (128; 256 with emb 128), `w_iter` (1; 4 for the W-MSE 2 STL/Tiny recipes),
    `w_eps` (0.0, the paper's runs). The number of views d is the recipe's number of augmented
    views (W-MSE 2 / W-MSE 4). The global batch (per-process batch x world size) must be a
    multiple of `w_size`.
    """

    name: ClassVar[str] = "wmse"

    def __init__(self, backbone: nn.Module, emb: int = 64, hidden: int = 1024, w_size: int = 128, w_iter: int = 1,
                 w_eps: float = 0.0):
        super().__init__(backbone)
        if w_size < 2 * emb:  # fail at construction, not at the first step
            raise ValueError(f"w_size={w_size} < 2*emb={2 * emb}: raise w_size or lower emb")
        if w_iter < 1:
            raise ValueError(f"w_iter must be >= 1, got {w_iter}")
        if not 0.0 <= w_eps < 1.0:
            raise ValueError(f"w_eps must be in [0, 1), got {w_eps}")
        self.emb, self.w_size, self.w_iter, self.w_eps = int(emb), int(w_size), int(w_iter), float(w_eps)
        self.projector = mlp((backbone.feature_dim, hidden, emb))  # biases on, BN on the hidden layer (wmse.md §3)

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        views = batch.views
        if len(views) < 2:
            raise ValueError(f"wmse needs at least 2 views per image, got {len(views)}; check the recipe's "
                             f"augmentation section")
        if any(v.shape != views[0].shape for v in views):
            raise ValueError(f"wmse: all views must have the same shape to share one backbone call, got "
                             f"{[tuple(v.shape) for v in views]}")
        z = self.projector(self.backbone(torch.cat(views)))  # [d*B, emb], view i = rows [iB, (i+1)B)
        z = torch.stack(z.chunk(len(views)), dim=1)  # [B, d, emb]: one gather keeps images aligned across views
        z = gather_with_grad(z)  # [world*B, d, emb]; no x world factor needed (see its docstring)
        loss = wmse_loss(z.unbind(1), self.w_size, self.w_iter, self.w_eps, generator=batch.generator)
        return loss, {"loss": loss.detach()}
