"""BlurPool (Zhang, "Making Convolutional Networks Shift-Invariant Again", ICML 2019) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BINOMIAL = torch.tensor([1.0, 2.0, 1.0])


def blur_2d(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """Depthwise [1 2 1] x [1 2 1] / 16 low-pass filter (zero padding), then ``stride``."""
    kernel = (_BINOMIAL[:, None] * _BINOMIAL[None, :] / 16.0).to(x.dtype).to(x.device)
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, 3, 3).contiguous()
    return F.conv2d(x, weight, stride=stride, padding=1, groups=channels)


class BlurConv2d(nn.Module):
    """A strided convolution that low-pass filters its input first, so downsampling does not alias.

    The original convolution is kept as ``conv`` (its parameter names gain ``.conv``).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(blur_2d(x))


class BlurMaxPool2d(nn.Module):
    """Max-pool densely (stride 1), then blur and subsample: the anti-aliased max-pool."""

    def __init__(self, pool: nn.MaxPool2d) -> None:
        super().__init__()
        self.kernel_size, self.padding = pool.kernel_size, pool.padding
        self.stride = pool.stride if isinstance(pool.stride, int) else pool.stride[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blur_2d(F.max_pool2d(x, self.kernel_size, stride=1, padding=self.padding), stride=self.stride)


def apply_blurpool(model: nn.Module, min_channels: int = 16, replace_maxpools: bool = True) -> int:
    """Blur before every strided conv with at least ``min_channels`` input channels; returns how many."""
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, (BlurConv2d, BlurMaxPool2d)):
            continue
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= min_channels:
                setattr(parent, name, BlurConv2d(child))
                count += 1
            elif replace_maxpools and isinstance(child, nn.MaxPool2d):
                setattr(parent, name, BlurMaxPool2d(child))
                count += 1
    return count
