"""Ghost batch normalization (Hoffer et al., NeurIPS 2017) as pure functions."""

from __future__ import annotations

import math

import torch
from torch import nn


class GhostBatchNorm(nn.Module):
    """Batch norm over "ghost" batches of ``ghost_batch_size`` rows: the noise of a small batch, at any batch size.

    As Composer: a batch of ``n`` rows is cut into ``ceil(n / ghost_batch_size)`` chunks of
    near-equal size (``torch.chunk``: 100 rows at 32 make 4 x 25, not 32+32+32+4), and the
    running-statistics momentum is divided by that number while they are normalised, so
    the statistics move as far per batch as one plain batch norm's would. In evaluation it
    is exactly the wrapped batch norm. One deviation: a batch smaller than a ghost batch is
    normalised whole, where Composer raises; one-class microbatches under a routing policy
    are routinely that small.
    """

    def __init__(self, batchnorm: nn.modules.batchnorm._BatchNorm, ghost_batch_size: int) -> None:
        super().__init__()
        if ghost_batch_size < 1:
            raise ValueError(f"ghost_batch_size must be at least 1, got {ghost_batch_size}")
        self.batchnorm = batchnorm
        self.ghost_batch_size = ghost_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.ghost_batch_size:
            return self.batchnorm(x)
        chunks = math.ceil(x.shape[0] / self.ghost_batch_size)
        momentum = self.batchnorm.momentum
        if momentum is not None:  # None: a cumulative average, which counts its updates itself
            self.batchnorm.momentum = float(momentum) / chunks
        try:
            return torch.cat([self.batchnorm(chunk) for chunk in x.chunk(chunks)])
        finally:
            self.batchnorm.momentum = momentum


def apply_ghost_batchnorm(model: nn.Module, ghost_batch_size: int = 32) -> int:
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, GhostBatchNorm):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, GhostBatchNorm(child, ghost_batch_size))
                count += 1
    return count
