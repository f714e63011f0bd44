"""Projector / predictor MLPs, built from a compact spec shared by every method."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def mlp(dims: Sequence[int], bias: bool = True, batch_norm: bool = True, last_bias: bool | None = None,
        last_bn: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """`Linear -> [BN] -> ReLU` for every hidden layer, then the last `Linear [-> BN]`.

    dims = (in, hidden..., out). `bias` applies to hidden Linears, `last_bias` (default `bias`) to
    the output Linear; `last_bn` appends a BatchNorm1d on the output (EquiMod, GroCo heads).
    """
    if len(dims) < 2:
        raise ValueError(f"an MLP needs at least (in, out) dims, got {dims}")
    last_bias = bias if last_bias is None else last_bias
    layers: list[nn.Module] = []
    for d_in, d_out in zip(dims[:-2], dims[1:-1]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if batch_norm:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(dims[-1], affine=last_bn_affine))
    return nn.Sequential(*layers)
