"""Ghost batch normalization (Hoffer et al., NeurIPS 2017) as pure functions."""

from __future__ import annotations

import torch
from torch import nn


class GhostBatchNorm(nn.Module):
    """Batch norm over "ghost" batches of ``ghost_batch_size`` rows: the noise of a small batch, at any batch size.

    In evaluation it is exactly the wrapped batch norm (the running statistics
    are shared, updated once per ghost batch).
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
        return torch.cat([self.batchnorm(chunk) for chunk in x.split(self.ghost_batch_size)])


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
