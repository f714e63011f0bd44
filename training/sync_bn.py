"""Batch statistics over every process, on CPU as on GPU.

torch's `nn.SyncBatchNorm` only runs on CUDA (DDP refuses it for CPU modules), yet the two-process
gloo runs that test the distributed path here, and CPU clusters, need the same semantics: BN
statistics of the global batch. `GlobalBatchNorm` computes per-channel sum and sum of squares
locally, all-reduces them with a differentiable all-reduce, and normalises with the global mean and
(biased) variance; running statistics use the unbiased global variance, as BatchNorm does. On CUDA
the trainer uses torch's SyncBatchNorm instead (its fused kernels are faster).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class GlobalBatchNorm(_BatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()) or not self.track_running_stats \
                and not self.training:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        xf = x if x.dtype == torch.float64 else x.float()  # half inputs: statistics in fp32
        count = torch.tensor([x.numel() / x.shape[1]], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        with warnings.catch_warnings():  # deprecated in favour of a private API; still the public one
            warnings.simplefilter("ignore", FutureWarning)
            stats = all_reduce(stats)  # differentiable: gradients flow back to every process's inputs
        c = x.shape[1]
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1).clamp_min(1), alpha=m)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def replace_batchnorm(module: nn.Module, match: type | tuple[type, ...], new_cls: type,
                      skip: type | tuple[type, ...] = ()) -> nn.Module:
    """Replace every `match` BatchNorm (not `skip`) by `new_cls` sharing its parameters and buffers."""
    if isinstance(module, match) and not isinstance(module, skip):
        new = new_cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, replace_batchnorm(child, match, new_cls, skip))
    return module


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by a GlobalBatchNorm sharing its parameters and buffers."""
    return replace_batchnorm(module, _BatchNorm, GlobalBatchNorm, skip=GlobalBatchNorm)
