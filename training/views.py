"""What the data path hands a method each step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Views:
    """A batch of B images seen through the recipe's augmentation pipelines.

    views:     V augmented views, each `[B, 3, S_v, S_v]` float, normalised, in recipe order
               (for ISD: teacher view first, then student view; for GroCo: global crops first).
    params:    per-view raw augmentation parameter vectors `[B, P]` (EquiMod), else None.
    original:  the un-augmented images `[B, 3, S, S]`, normalised (EquiMod), else None.
    generator: a torch.Generator seeded from (seed, step) by the trainer: all randomness a loss
               needs (W-MSE partitions, MSBReg directions) comes from it, so a resumed run and
               every DDP rank draw the same numbers.
    step, total_steps: the global optimisation step (0-based) and the run's length.
    """

    views: list[torch.Tensor]
    params: list[torch.Tensor] | None = None
    original: torch.Tensor | None = None
    generator: torch.Generator = field(default_factory=torch.Generator)
    step: int = 0
    total_steps: int = 1

    @property
    def batch_size(self) -> int:
        return self.views[0].shape[0]
