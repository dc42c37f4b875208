"""Low-precision LayerNorm and GroupNorm (as in Composer): run norms in the autocast dtype on GPUs.

Under ``torch.autocast`` PyTorch computes layer and group norms in fp32
(its autocast op lists put them there). These modules run them in the
autocast dtype (bf16/fp16) instead, which is faster on a GPU. Outside
autocast, or on a CPU, they are the original norm exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


class LowPrecisionLayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        return _uncast(
            F.layer_norm,
            x.to(dtype),
            self.normalized_shape,
            _cast(self.weight, dtype),
            _cast(self.bias, dtype),
            self.eps,
        )


class LowPrecisionGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x)
        if dtype is None:
            return super().forward(x)
        return _uncast(
            F.group_norm, x.to(dtype), self.num_groups, _cast(self.weight, dtype), _cast(self.bias, dtype), self.eps
        )


def _uncast(norm: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """Run ``norm`` with autocast off, so it stays in the dtype its inputs were cast to."""
    with torch.autocast("cuda", enabled=False):
        return norm(*args)


def _swap_class(model: nn.Module, original: type, replacement: type) -> int:
    """Change the class of each exact ``original`` instance in place: same parameters, same names."""
    count = 0
    for module in model.modules():
        if type(module) is original:
            module.__class__ = replacement
            count += 1
    return count


def apply_low_precision_layernorm(model: nn.Module) -> int:
    return _swap_class(model, nn.LayerNorm, LowPrecisionLayerNorm)


def apply_low_precision_groupnorm(model: nn.Module) -> int:
    return _swap_class(model, nn.GroupNorm, LowPrecisionGroupNorm)
