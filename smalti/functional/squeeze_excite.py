"""Squeeze-and-Excitation (Hu et al., CVPR 2018) as pure functions."""

from __future__ import annotations

import torch
from torch import nn


class SqueezeExcite2d(nn.Module):
    """Reweights channels by a gate computed from their global average: x * sigmoid(W2 relu(W1 mean(x)))."""

    def __init__(self, channels: int, latent_channels: int) -> None:
        super().__init__()
        self.squeeze = nn.Linear(channels, latent_channels)
        self.excite = nn.Linear(latent_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * gate[:, :, None, None]


class SqueezeExciteConv2d(nn.Module):
    """A convolution followed by squeeze-excite; the convolution is kept as ``conv``."""

    def __init__(self, conv: nn.Conv2d, latent_channels: float) -> None:
        super().__init__()
        self.conv = conv
        latent = latent_channels if latent_channels >= 1 else max(1, int(conv.out_channels * latent_channels))
        self.se = SqueezeExcite2d(conv.out_channels, int(latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(self.conv(x))


def apply_squeeze_excite(model: nn.Module, min_channels: int = 64, latent_channels: float = 64) -> int:
    """Add squeeze-excite after every conv with at least ``min_channels`` outputs; returns how many.

    ``latent_channels`` below 1 is a fraction of the conv's output channels.
    """
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, SqueezeExciteConv2d):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and child.out_channels >= min_channels and child.kernel_size != (1, 1):
                setattr(parent, name, SqueezeExciteConv2d(child, latent_channels))
                count += 1
    return count
