"""GroCo: learning by sorting with group ordering constraints (Shvetsova et al., ICCV 2023).

Reference: ninatu/learning_by_sorting @ 47c074e (`losses/groco.py`, `models/projection/...`), as
described in `docs/methods/groco.md`. The code here is written from that
description; nothing is copied.

Loss (per anchor view a, image b; see `groco_loss` for the full formula): the cosine similarities of
the anchor to its positives (the other global views of image b) and to its `topk_neg` hardest
negatives (other images, same view) are each sorted ascending and concatenated negatives first;
a differentiable odd-even sorting network (Cauchy relaxation) turns them into a soft permutation
matrix, and a BCE asks every negative to stay in the bottom block and every positive in the top one.

Deliberate differences from the authors' code, and why:
1. Sorters are built lazily on the inputs' device and dtype and cached per
   (n, steepness, device, dtype), instead of two CPU sorters built in `__init__` and moved by
   overriding `.cuda()`/`.to()`. diffsort keeps its networks in plain lists (not buffers), so the
   override is fragile (`module.to` through a parent, DDP, meta/fp64); a cache keyed on the inputs
   cannot be on the wrong device. The sorter size follows the actual number of positives of each
   anchor (k + n_global - 1 for a global anchor, k + n_global for a local one), which gives the
   same two sizes as the reference's `sorter`/`sorter2`.
2. `topk_neg` is guarded: a sorting network larger than 64 wires is refused with a one-line error
   (odd-even work grows as n^4; docs/methods/groco.md §11 point 3: n=64 ~3.6 s, n=128 ~73 s per step at B=1024
   on CPU). So is a batch with fewer than `topk_neg` other images, which in the reference would
   select masked `-inf` entries and turn the loss into NaN.
3. No `print(sims[0])` on 1 % of steps: it writes to stdout and consumes Python's global `random`,
   breaking resumability. The same information (positive-block probability, hard ordering
   accuracy) goes to the method's logs, averaged over all anchors (the reference logs anchor 1).
4. Both positives and negatives use `F.normalize(eps=1e-8)` then a dot product; the reference uses
   `nn.CosineSimilarity` for the positives (eps applied to the product of norms). Identical except
   for near-zero vectors, which BN-standardised 2048-d projections never are.
5. float64 inputs stay float64 (the reference always casts to fp32) so `gradcheck` can run; fp16
   and bf16 are cast to fp32 and autocast is disabled inside the loss, as in the reference.
6. With `stop_grad=False` under DDP the negatives are gathered with `gather_with_grad` (gradient
   summed over ranks, see `training/distributed.py`) instead of the authors' `GatherLayer`. Every
   published config uses `stop_grad=True`, where negatives are detached and no gradient crosses ranks.
7. Views of equal crop size go through the backbone in one call (one call per distinct size), so
   BatchNorm statistics are shared by the crops of one size; this is the zoo's convention for
   multi-crop methods and is cheaper on CPU. (How the reference trainer batches its encoder calls is
   not in the spec.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_no_grad, gather_with_grad
from training.methods.base import SSLMethod, forward_by_size, loss_dtype, no_autocast
from training.methods.heads import mlp
from training.views import Views
from zoo.distributed import rank

# Largest sorting network accepted (wires). Odd-even work is O(B n^4): see module docstring, point 2.
MAX_SORTER_SIZE = 64

SorterCache = dict[tuple[int, float, torch.device, torch.dtype], nn.Module]
# Used when the caller passes no cache; bounded because keys include device and dtype.
_DEFAULT_SORTERS: SorterCache = {}


def _sorter(n: int, steepness: float, device: torch.device, dtype: torch.dtype,
            sorters: SorterCache | None) -> nn.Module:
    """The cached odd-even/Cauchy DiffSortNet of size n on `device`, its matrices already in `dtype`."""
    cache = _DEFAULT_SORTERS if sorters is None else sorters
    key = (n, float(steepness), device, dtype)
    if key not in cache:
        from zoo.errors import require

        diffsort = require("diffsort", "groco", "GroCo's differentiable sorting network")
        sorter = diffsort.DiffSortNet("odd_even", n, steepness=steepness, distribution="cauchy", device=device)
        # Convert once here, so diffsort's per-layer `.type(x.dtype)` is a no-op every step.
        sorter.sorting_network = [[m.to(dtype) for m in layer] for layer in sorter.sorting_network]
        if sorters is None and len(cache) >= 32:
            cache.clear()
        cache[key] = sorter
    return cache[key]


def _check_sorter_size(topk_neg: int, n_pos: int) -> None:
    n = topk_neg + n_pos
    if topk_neg < 1:
        raise ValueError(f"topk_neg must be >= 1, got {topk_neg}")
    if n > MAX_SORTER_SIZE:
        raise ValueError(
            f"topk_neg={topk_neg} with {n_pos} positives needs a sorting network of {n} wires > {MAX_SORTER_SIZE}: "
            f"odd-even costs O(B*n^4) (n=64 ~3.6 s, n=128 ~73 s per step at B=1024 on CPU); "
            f"use topk_neg <= {MAX_SORTER_SIZE - n_pos} (the paper uses 10)")




def soft_permutation(sims: torch.Tensor, steepness: float = 1.0, sorters: SorterCache | None = None) -> torch.Tensor:
    """Soft permutation `P [B, n, n]` of the rows of `sims [B, n]` by an odd-even Cauchy sorting network.

    diffsort's convention: `soft_sorted = sims @ P`, so `P[b, i, j]` is the probability that input i
    lands at ascending rank j. Rows and columns each sum to 1 (doubly stochastic).
    """
    return _sorter(sims.shape[1], steepness, sims.device, sims.dtype, sorters)(sims)[1]


def sorting_loss(neg_sims: torch.Tensor, pos_sims: torch.Tensor, steepness: float = 1.0,
                 sorters: SorterCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GroCo's group-ordering BCE for one anchor view; returns (loss, q_pos [B, n]).

    neg_sims `[B, k]`, pos_sims `[B, P]`: similarities, each block already sorted ascending, so that
    the ground-truth permutation of `s = [neg | pos]` is the identity. With `P` its soft permutation,
    `q_neg(i) = sum_{j<k} P[i, j]`, `q_pos(i) = sum_{j>=k} P[i, j]` (both clipped to [0, 1]: the
    network's sums drift from 1 by rounding), targets `t_neg = 1[i<k]`, `t_pos = 1 - t_neg`, and
    `loss = (BCE(q_pos, t_pos) + BCE(q_neg, t_neg)) / 2`, each BCE a mean over the B x n entries.
    """
    k = neg_sims.shape[1]
    sims = torch.cat([neg_sims, pos_sims], dim=1)
    perm = soft_permutation(sims, steepness, sorters)
    q_neg = perm[:, :, :k].sum(-1).clamp(0.0, 1.0)
    q_pos = perm[:, :, k:].sum(-1).clamp(0.0, 1.0)
    t_neg = torch.zeros_like(q_neg)
    t_neg[:, :k] = 1.0  # identity permutation: the first k inputs belong to the bottom k ranks
    t_pos = 1.0 - t_neg
    loss = 0.5 * (F.binary_cross_entropy(q_pos, t_pos) + F.binary_cross_entropy(q_neg, t_neg))
    return loss, q_pos


def _groco(views: list[torch.Tensor], topk_neg: int, steepness: float, n_global: int | None, stop_grad: bool,
           sorters: SorterCache | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n_views = len(views)
    n_global = n_views if n_global is None else n_global
    if not 2 <= n_global <= n_views:
        raise ValueError(f"need 2 <= n_global <= number of views ({n_views}) so that every anchor has a positive, "
                         f"got n_global={n_global}")
    _check_sorter_size(topk_neg, n_global if n_global < n_views else n_global - 1)
    device = views[0].device
    with no_autocast(device):
        zs = [F.normalize(v.to(loss_dtype(v)), dim=1, eps=1e-8) for v in views]
        b = zs[0].shape[0]
        total = zs[0].new_zeros(())
        q_pos_sum, correct = zs[0].new_zeros(()), zs[0].new_zeros(())
        for a, anchor in enumerate(zs):
            positives = [zs[g] for g in range(n_global) if g != a]
            pos = torch.stack([p.detach() if stop_grad else p for p in positives], dim=1)  # [B, P, D]
            pos_sims = torch.einsum("bd,bpd->bp", anchor, pos).sort(dim=1).values
            # Negatives: the other images in the anchor's own view, from the global batch under DDP.
            negatives = gather_no_grad(anchor.detach()) if stop_grad else gather_with_grad(anchor)
            if negatives.shape[0] - 1 < topk_neg:
                raise ValueError(f"topk_neg={topk_neg} needs at least {topk_neg + 1} images in the (global) batch, "
                                 f"got {negatives.shape[0]}; lower topk_neg or raise the batch size")
            neg_all = anchor @ negatives.T  # [B, B_global]
            rows = torch.arange(b, device=device)
            neg_all = neg_all.index_put((rows, rows + rank() * b), neg_all.new_tensor(-math.inf))
            # topk gives the hardest (most similar) negatives in descending order; flip to ascending.
            neg_sims = neg_all.topk(topk_neg, dim=1).values.flip(1)
            loss, q_pos = sorting_loss(neg_sims, pos_sims, steepness, sorters)
            total = total + loss
            with torch.no_grad():
                q_pos_sum += q_pos[:, topk_neg:].mean()
                correct += (pos_sims[:, 0] > neg_sims[:, -1]).to(total.dtype).mean()
    stats = {"q_pos": q_pos_sum / n_views, "order_acc": correct / n_views}
    return total / n_views, stats


def groco_loss(views: list[torch.Tensor], topk_neg: int = 10, steepness: float = 1.0, n_global: int | None = None,
               stop_grad: bool = True, sorters: SorterCache | None = None) -> torch.Tensor:
    """GroCo loss over V projector outputs `[B, D]`, the first `n_global` (default all) global crops.

    Every view a is the anchor once. For anchor row b (z = normalize(views[a][b])):
      pos = sort_asc{ cos(z, views[g][b]) : g < n_global, g != a }                  (P of them)
      neg = sort_asc( top_k{ cos(z, views[a][c]) : c != b } )  (c over the global batch under DDP)
      s = [neg | pos],  P_soft = DiffSort_{odd-even, Cauchy, beta=steepness}(s)  (s_sorted = s @ P_soft)
      q_neg(i) = clip(sum_{j<k} P_soft[i, j]),  q_pos(i) = clip(sum_{j>=k} P_soft[i, j])
      l_a = 1/2 [ BCE(q_pos, 1[i>=k]) + BCE(q_neg, 1[i<k]) ]      (mean over the batch and the n=k+P slots)
    and the loss is mean_a l_a. With `stop_grad` (all published configs) the positives and negatives
    are detached, so the gradient flows through the anchor only.

    Why similarities, not distances: the relaxed swap mixes the two wires with weight
    atan(beta (b - a)) / pi + 1/2, so "sorted ascending" means least to most similar; with
    similarities the positives belong at the top (the last P ranks). Distances would reverse that
    and the targets (negatives first) would ask for the opposite of what the model should learn.
    Why the order matters: each block is pre-sorted and the negatives come first, so the
    ground-truth permutation is exactly the identity and the loss constrains only the *groups*
    (every positive above every negative), not the order within a group.
    Why not distances with mirrored targets, which look equivalent: the odd-even network is mirror-
    symmetric only for an even number of wires. For odd n (n = 10 + 1 = 11 with the published 2-view
    config) reversing the wires maps the layer that starts at wire 0 onto the one that starts at wire 1,
    i.e. onto a different network, and since the Cauchy relaxation at steepness 1 never saturates the
    soft permutation, and so the loss and its gradient, differ: only similarities ascending reproduce
    the authors' numbers.

    Runs in fp32 outside autocast (fp64 inputs stay fp64); sorters are cached per
    (n, steepness, device, dtype) in `sorters` (a module-level cache when None).
    """
    return _groco(views, topk_neg, steepness, n_global, stop_grad, sorters)[0]


class GroCo(SSLMethod):
    """GroCo (ICCV 2023): backbone + 3-layer projector, trained with `groco_loss`.

    Hyperparameters (recipe `method:` section): `topk_neg=10` hardest negatives per anchor,
    `steepness=1.0` (Cauchy relaxation beta), `n_global=None` (number of global crops, stored first;
    None = all views), `stop_grad=True`, `proj_hidden=2048`, `proj_dim=2048`.
    No predictor, no momentum network. GroCo's gradients are ~700x smaller than NT-Xent's
    (docs/methods/groco.md §11 point 2): the published recipes use plain SGD with lr 24 at batch 1024, not LARS.
    """

    name: ClassVar[str] = "groco"

    def __init__(self, backbone: nn.Module, topk_neg: int = 10, steepness: float = 1.0, n_global: int | None = None,
                 stop_grad: bool = True, proj_hidden: int = 2048, proj_dim: int = 2048):
        super().__init__(backbone)
        # Fail at construction, not at the first step (the smallest possible sorter: one positive).
        _check_sorter_size(topk_neg, n_global if n_global is not None else 1)
        self.topk_neg, self.steepness, self.n_global, self.stop_grad = topk_neg, steepness, n_global, stop_grad
        # [Linear(no bias) BN ReLU] x 2 -> Linear(bias) -> BN(affine=False)  (docs/methods/groco.md §4)
        self.projector = mlp((backbone.feature_dim, proj_hidden, proj_hidden, proj_dim), bias=False, last_bias=True,
                             last_bn=True, last_bn_affine=False)
        # The authors freeze this bias "for comparability"; the affine-free BN cancels it anyway.
        self.projector[-2].bias.requires_grad_(False)
        self._sorters: SorterCache = {}  # not state: rebuilt on demand on the inputs' device

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        views = forward_by_size(batch.views, lambda x: self.projector(self.backbone(x)))
        loss, stats = _groco(views, self.topk_neg, self.steepness, self.n_global, self.stop_grad, self._sorters)
        return loss, {"loss": loss.detach(), **stats}
