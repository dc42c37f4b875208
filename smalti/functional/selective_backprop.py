"""Selective backprop (Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers", 2019)."""

from __future__ import annotations

import torch


def should_select(batch_index: int, elapsed: float, start: float = 0.5, end: float = 0.9, interrupt: int = 2) -> bool:
    """Active between ``start`` and ``end`` (fractions of training), skipping every ``interrupt``-th batch."""
    if not start <= elapsed < end:
        return False
    return interrupt <= 0 or batch_index % interrupt != 0


def select_by_loss(losses: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted) of ``round(keep * n)`` examples, drawn without replacement with probability
    proportional to the percentile of their loss: high-loss examples are kept most often, none surely."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n = losses.numel()
    count = max(1, int(round(keep * n)))
    if count >= n:
        return torch.arange(n, device=losses.device)
    percentile = (losses.float().cpu().argsort().argsort().double() + 1.0) / n
    chosen = torch.multinomial(percentile, count, replacement=False, generator=generator)
    return chosen.sort().values.to(losses.device)
