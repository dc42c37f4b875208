"""Weight averages for SWA (Izmailov et al., UAI 2018): an equal-weight running mean of model states."""

from __future__ import annotations

import torch


def update_running_average(average: dict[str, torch.Tensor], model: torch.nn.Module, count: int) -> int:
    """Fold the model's current floating-point state into ``average`` (the mean of ``count`` states); returns count + 1.

    Integer buffers (batch norm's step counter) take the latest value.
    """
    for name, tensor in model.state_dict().items():
        current = tensor.detach()
        if name not in average or not current.is_floating_point():
            average[name] = current.clone()
        else:
            if average[name].device != current.device:  # restored from a checkpoint onto another device
                average[name] = average[name].to(current.device)
            average[name].mul_(count / (count + 1.0)).add_(current, alpha=1.0 / (count + 1.0))
    return count + 1
