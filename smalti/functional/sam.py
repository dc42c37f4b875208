"""Sharpness-aware minimization (Foret et al., ICLR 2021) as a pure function."""

from __future__ import annotations

import torch


def sharpness_aware_perturbation(
    parameters: list[torch.nn.Parameter], rho: float, epsilon: float = 1e-12
) -> list[torch.Tensor]:
    """SAM's ascent step (Foret et al., ICLR 2021): ``e = rho * g / ||g||``, added to the parameters; returns it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.norm(torch.stack([g.norm() for g in grads])) if grads else torch.zeros(())
    scale = rho / (norm + epsilon)
    steps = []
    with torch.no_grad():
        for p in parameters:
            step = p.grad * scale if p.grad is not None else torch.zeros_like(p)
            p.add_(step)
            steps.append(step)
    return steps
