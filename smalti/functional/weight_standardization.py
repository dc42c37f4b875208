"""Weight standardization (Qiao et al., 2019) as pure functions, via ``torch.nn.utils.parametrize``."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize


def standardize_weight(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each output filter to zero mean and unit variance over its fan-in."""
    dims = tuple(range(1, weight.dim()))
    mean = weight.mean(dim=dims, keepdim=True)
    var = weight.var(dim=dims, unbiased=False, keepdim=True)
    return (weight - mean) / torch.sqrt(var + eps)


class WeightStandardizer(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return standardize_weight(weight)


def apply_weight_standardization(model: nn.Module, n_last_layers_ignore: int = 0) -> int:
    """Standardize every conv's weight except the last ``n_last_layers_ignore`` convs (in module order).

    The stored parameter becomes ``<conv>.parametrizations.weight.original``
    (torch's naming); the conv's ``weight`` is its standardized view.
    """
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    chosen = convs[: len(convs) - n_last_layers_ignore] if n_last_layers_ignore else convs
    count = 0
    for conv in chosen:
        if parametrize.is_parametrized(conv, "weight"):
            continue
        parametrize.register_parametrization(conv, "weight", WeightStandardizer())
        count += 1
    return count
