"""Optimisers and per-step learning-rate schedules the recipes need."""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as SimCLR/BYOL/EquiMod use.

    update = lr * (g + wd * w) * trust, trust = eta * ||w|| / ||g + wd * w|| for groups with
    `lars=True`; groups with `lars=False` (BN parameters and biases, per the authors) get plain
    SGD-momentum with their own weight decay (0 for them in the recipes). Written by hand because
    torch ships no LARS.

    Against the EquiMod authors' `LARSW` (ADevillers/EquiMod@908c7b4 src/lars.py), read 2026-11-29: the
    trust ratio is theirs (weight decay added to the gradient first, then eta * ||w|| / ||g + wd * w||,
    1 when either norm is 0). One deliberate difference: their momentum buffer accumulates lr-scaled
    steps (buf = m * buf + lr * trust * d), ours accumulates unscaled ones and multiplies by the current
    lr (torch.optim.SGD's convention). Identical at constant lr; under warm-up/cosine the two differ by
    how fast an lr change reaches the update (ours: at once; theirs: through the momentum average).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 1e-3, nesterov: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True,
                                      nesterov=nesterov))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad.clone()
                if group["lars"]:
                    w_norm, d_norm = p.norm(), d.norm()
                    trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm,
                                        torch.ones_like(w_norm))
                    d.mul_(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = d.clone()
                else:
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(d.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf, alpha=-group["lr"])


def _split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights of Linear/Conv layers, everything else: BN parameters and biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def build_optimizer(model: nn.Module, cfg: dict[str, Any], batch_size: int) -> tuple[torch.optim.Optimizer, list[float]]:
    """The recipe's `optim:` section -> (optimizer, base lr per param group).

    lr scaling: `scaling: linear` gives lr * batch/256 (SimCLR, BYOL), `sqrt` lr * sqrt(batch),
    `none` (default) the lr as written.
    """
    name = cfg["name"].lower()
    lr = float(cfg["lr"])
    scaling = cfg.get("scaling", "none")
    if scaling == "linear":
        lr *= batch_size / 256
    elif scaling == "sqrt":
        lr *= math.sqrt(batch_size)
    elif scaling != "none":
        raise ValueError(f"optim.scaling must be none, linear or sqrt, got {scaling!r}")
    wd = float(cfg.get("weight_decay", 0.0))
    exclude = bool(cfg.get("exclude_bn_bias", name == "lars"))
    decay, no_decay = _split_decay(model)
    if exclude:
        groups = [dict(params=decay, weight_decay=wd), dict(params=no_decay, weight_decay=0.0, lars=False)]
    else:
        groups = [dict(params=decay + no_decay, weight_decay=wd)]
    groups = [g for g in groups if g["params"]]
    momentum = float(cfg.get("momentum", 0.9))
    if name == "sgd":
        for g in groups:
            g.pop("lars", None)
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=bool(cfg.get("nesterov", False)))
    elif name == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum, eta=float(cfg.get("eta", 1e-3)))
    elif name in ("adam", "adamw"):
        for g in groups:
            g.pop("lars", None)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        opt = cls(groups, lr=lr, betas=tuple(cfg.get("betas", (0.9, 0.999))))
    else:
        raise ValueError(f"unknown optimizer {name!r}; use sgd, lars, adam or adamw")
    return opt, [lr] * len(opt.param_groups)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, cfg: dict[str, Any]) -> float:
    """Multiplier of the base lr at a step: linear warm-up, then cosine / step drops / constant.

    schedule: {kind: cosine|step|constant, warmup_epochs | warmup_steps, warmup_start: 0,
               final_factor: 0 (cosine), milestones: [epochs] and gamma (step)}; a recipe's
    `milestone_fractions` reach here as milestones (training.recipe resolves them).
    A pure function of the step, so resuming needs no scheduler state.
    """
    warmup = int(cfg.get("warmup_steps", round(float(cfg.get("warmup_epochs", 0)) * steps_per_epoch)))
    if step < warmup:
        start = float(cfg.get("warmup_start", 0.0))
        return start + (1.0 - start) * (step + 1) / warmup
    kind = cfg.get("kind", "cosine")
    if kind == "cosine":
        final = float(cfg.get("final_factor", 0.0))
        progress = (step - warmup) / max(1, total_steps - warmup)
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "step":
        epoch = step / steps_per_epoch
        return float(cfg.get("gamma", 0.1)) ** sum(epoch >= m for m in cfg.get("milestones", []))
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown schedule kind {kind!r}; use cosine, step or constant")
