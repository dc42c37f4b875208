"""Exponential moving average of weights as a pure function."""

from __future__ import annotations

from typing import Iterable

import torch


def ema_smoothing(update_interval_batches: float, half_life_batches: float) -> float:
    """The per-update decay that halves an old weight's influence every ``half_life``."""
    if half_life_batches <= 0:
        raise ValueError("half_life must be positive")
    return 0.5 ** (update_interval_batches / half_life_batches)


@torch.no_grad()
def compute_ema(averages: Iterable[torch.Tensor], current: Iterable[torch.Tensor], smoothing: float) -> None:
    """In place: ``average = smoothing * average + (1 - smoothing) * current`` for each floating pair.

    Pass buffers as well as parameters (Composer does): an average model evaluated with the
    live model's batch-norm statistics normalises with the wrong mean and variance. Integer
    tensors (batch norm's ``num_batches_tracked``) are copied, not averaged: a counter has no
    meaningful average, and Composer's, truncated into the integer buffer, lags the true count
    that a cumulative-average batch norm (``momentum=None``) divides by.
    """
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    for average, value in zip(averages, current, strict=True):
        if average.is_floating_point():
            average.lerp_(value.to(average.dtype), 1.0 - smoothing)
        else:
            average.copy_(value)
