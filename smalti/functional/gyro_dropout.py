"""Gyro dropout (Park et al., "Gyro Dropout", MLSys 2022) as pure functions.

Plain dropout samples a fresh sub-network every step, so each one is
trained once. Gyro dropout pre-selects ``sigma`` sub-networks (masks) and
trains ``tau`` of them at a time, each on its share of the batch, rotating
to the next ``tau`` every ``rotate_every`` steps, so every chosen
sub-network is trained many times.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class GyroDropoutLayer(nn.Module):
    """Replaces ``nn.Dropout``; the masks and the step counter are buffers, so they survive a checkpoint."""

    masks: torch.Tensor
    steps: torch.Tensor
    seed: torch.Tensor

    def __init__(self, p: float, sigma: int, tau: int, rotate_every: int = 1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0 or sigma < 1 or not 1 <= tau <= sigma:
            raise ValueError(f"gyro dropout needs 0 <= p < 1 and 1 <= tau <= sigma, got p={p} sigma={sigma} tau={tau}")
        self.p, self.sigma, self.tau, self.rotate_every = p, sigma, tau, max(1, rotate_every)
        self.register_buffer("masks", torch.empty(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        # Drawn now, from the run's seeded stream (the same on every rank): the masks, made on the first
        # step once the width is known, are then the same on every rank and in every resumed run.
        self.register_buffer("seed", torch.randint(2**62, ()))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        masks = state_dict.get(prefix + "masks")
        if masks is not None and masks.shape != self.masks.shape:
            self.masks = torch.empty_like(masks, device=self.masks.device)  # sized lazily on the first step
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def active_masks(self) -> torch.Tensor:
        """The ``tau`` masks trained at the current step [tau, features]."""
        group = int(self.steps) // self.rotate_every
        chosen = (group * self.tau + torch.arange(self.tau, device=self.masks.device)) % self.sigma
        return self.masks[chosen]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        features = x.shape[-1]
        if self.masks.numel() == 0:
            generator = torch.Generator().manual_seed(int(self.seed))
            keep = torch.empty(self.sigma, features).bernoulli_(1.0 - self.p, generator=generator)
            self.masks = (keep / (1.0 - self.p)).to(x.device)
        masks = self.active_masks().to(x.dtype)
        rows = torch.arange(x.shape[0], device=x.device) * self.tau // max(1, x.shape[0])
        self.steps += 1
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (features,)
        return x * masks[rows].view(shape)


def apply_gyro_dropout(model: nn.Module, sigma: int = 256, tau: int = 16, rotate_every: int = 1) -> int:
    """Replace every ``nn.Dropout`` with p > 0; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(parent, name, GyroDropoutLayer(child.p, sigma, tau, rotate_every))
                count += 1
    return count
