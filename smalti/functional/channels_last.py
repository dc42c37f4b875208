"""Channels-last memory format (NHWC) for convolutional models, as pure functions."""

from __future__ import annotations

import torch
from torch import nn


def apply_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-d parameter and buffer NHWC; on GPUs cuDNN's fastest convolutions want it. Outputs are unchanged."""
    # Module.to accepts memory_format at runtime; torch's overload stubs leave it out
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
