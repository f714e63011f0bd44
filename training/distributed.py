"""The all-gathers that methods share (no-ops in a single process); rank and world size are zoo.distributed's."""

from __future__ import annotations

import torch
import torch.distributed as dist

from zoo.distributed import is_distributed, world_size


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather `[n, ...]` from every process into `[world * n, ...]`, rank order, keeping gradients.

    The backward (torch.distributed.nn's all_gather) sums every rank's gradient of its own copy
    of the loss and returns each rank its slice: with every rank computing the same loss on the
    gathered batch, that is `world x dL/dx_local`, which DDP's averaging turns back into the
    single-process gradient. So a loss on gathered tensors needs no `x world_size` factor (the
    EquiMod authors need one because their gather carries gradient only for the local part).
    """
    if not is_distributed() or world_size() == 1:
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in favour of a private API; still the public differentiable one
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x.contiguous()), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (queues, monitors)."""
    if not is_distributed() or world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)
