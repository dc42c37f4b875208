"""Label smoothing as a pure function."""

from __future__ import annotations

import torch

from smalti.core.batch import IGNORE_INDEX


def smooth_labels(
    targets: torch.Tensor, num_classes: int, smoothing: float, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Target ids [...] -> distributions [..., num_classes]: ``(1 - s) * one_hot + s / K``.

    Positions equal to ``ignore_index`` get an all-zero row, so they add
    nothing to a summed cross-entropy. Targets that are already
    distributions (MixUp, CutMix) are smoothed the same way:
    ``(1 - s) * p + s / K``, all-zero rows staying zero.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
    if targets.is_floating_point():
        valid = targets.sum(-1, keepdim=True) > 0
        return (targets * (1.0 - smoothing) + smoothing / num_classes) * valid
    valid = targets != ignore_index
    one_hot = torch.nn.functional.one_hot(targets.clamp(min=0), num_classes).float()
    smoothed = one_hot * (1.0 - smoothing) + smoothing / num_classes
    return smoothed * valid.unsqueeze(-1)
