"""Gradient clipping by norm, by value, and adaptive (Brock et al., "High-Performance Large-Scale Image
Recognition Without Normalization", 2021) as pure functions."""

from __future__ import annotations

from typing import Iterable

import torch


def _unit_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm of each output unit (row / filter); vectors and scalars are one unit."""
    if t.dim() <= 1:
        return t.norm().expand_as(t) if t.dim() else t.abs()
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def adaptive_clip_(
    parameters: Iterable[torch.nn.Parameter], clipping_threshold: float = 0.01, eps: float = 1e-3
) -> None:
    """Per unit: scale the gradient down to ``threshold * max(||w||, eps)`` if it is larger."""
    for p in parameters:
        if p.grad is None:
            continue
        max_norm = _unit_norms(p.detach()).clamp(min=eps) * clipping_threshold
        grad_norm = _unit_norms(p.grad.detach())
        factor = torch.where(grad_norm > max_norm, max_norm / grad_norm.clamp(min=1e-6), torch.ones_like(grad_norm))
        p.grad.detach().mul_(factor)


def apply_gradient_clipping(
    parameters: Iterable[torch.nn.Parameter], clipping_type: str, clipping_threshold: float
) -> None:
    parameters = [p for p in parameters if p.grad is not None]
    if clipping_type == "norm":
        torch.nn.utils.clip_grad_norm_(parameters, clipping_threshold)
    elif clipping_type == "value":
        torch.nn.utils.clip_grad_value_(parameters, clipping_threshold)
    elif clipping_type == "adaptive":
        adaptive_clip_(parameters, clipping_threshold)
    else:
        raise ValueError(f"clipping_type must be 'norm', 'value' or 'adaptive', got {clipping_type!r}")
