"""NoOpModel: replace the model with one that computes nothing, to measure the loop's own cost."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class NoOpModel(nn.Module):
    """Outputs zeros of the original model's output shape through one scalar parameter.

    It keeps the original's ``loss``, ``loss_units``, ``example_losses`` (and ``accuracy_counts``),
    so the trainer, its algorithms and the governance layer run unchanged:
    what remains of a step's time is data loading, bookkeeping and logging.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        config = getattr(original, "config", None)
        width = getattr(config, "vocab_size", None) or getattr(config, "num_classes", None)
        if width is None:
            raise ValueError(
                f"NoOpModel needs a model whose config names vocab_size or num_classes, got {type(original).__name__}"
            )
        self.config = config
        self.width = int(width)
        self.token_model = hasattr(config, "vocab_size")
        self.weight = nn.Parameter(torch.zeros(()))
        self._original_type: type[Any] = type(original)  # its loss methods are looked up by name
        if hasattr(self._original_type, "accuracy_counts"):  # a classifier: evaluation still reports accuracy
            self.accuracy_counts = self._original_type.accuracy_counts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        leading = tuple(x.shape[:2]) if self.token_model else (x.shape[0],)
        return self.weight.expand(*leading, self.width) * 1.0

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._original_type.loss(outputs, targets)

    def loss_units(self, targets: torch.Tensor) -> torch.Tensor:
        return self._original_type.loss_units(targets)

    def example_losses(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self._original_type.example_losses(outputs, targets)


def apply_noop_model(model: nn.Module) -> nn.Module:
    return model if isinstance(model, NoOpModel) else NoOpModel(model)
