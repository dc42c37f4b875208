"""Selective backprop (Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers", 2019)."""

from __future__ import annotations

import torch


def should_select(batch_index: int, elapsed: float, start: float = 0.5, end: float = 0.9, interrupt: int = 2) -> bool:
    """Active between ``start`` and ``end`` (fractions of training), except on every ``interrupt``-th batch
    of the epoch (``batch_index`` counts from 0, so batches 1, 3, 5, ... at ``interrupt`` 2), as Composer."""
    if not start <= elapsed < end:
        return False
    return interrupt <= 0 or (batch_index + 1) % interrupt != 0


def select_by_loss(losses: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (sorted) of ``int(keep * n)`` examples (at least one), drawn without replacement.

    As Composer: the example of loss rank ``r`` (0 = lowest) has percentile ``(r + 0.5) / n``
    and is drawn with probability proportional to ``percentile ** (1 / keep - 1)``: the smaller
    ``keep``, the more the draw favours the hardest examples (at ``keep`` 0.5, in proportion to
    the percentile). Ties in the loss rank in index order.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n = losses.numel()
    count = max(1, int(keep * n))  # Composer would keep none of a batch smaller than 1 / keep
    if count >= n:
        return torch.arange(n, device=losses.device)
    ranks = losses.float().cpu().argsort(stable=True).argsort().double()
    weights = ((ranks + 0.5) / n) ** (1.0 / keep - 1.0)
    chosen = torch.multinomial(weights, count, replacement=False, generator=generator)
    return chosen.sort().values.to(losses.device)
