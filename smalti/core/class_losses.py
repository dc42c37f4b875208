"""Held-out loss per provenance class, summed on the device while evaluation runs.

Why per class: a governed run has to answer "how well does the model do on
each source?", and a deletion certificate states the forgotten class's loss
before and after. The trainer records these losses at every evaluation (the
final checkpoint carries the last ones), so ``smalti forget`` reads the
parent's and the replay's instead of evaluating both again; ``smalti eval
--by-class`` computes them with the same code, which is what makes the
numbers comparable to the digit.
"""

from __future__ import annotations

from typing import Any

import torch


class ClassLosses:
    """Summed loss and loss units per class; ``means`` gives the mean loss per target unit of each class seen."""

    def __init__(self, classes: int, device: torch.device | str = "cpu") -> None:
        self.sums = torch.zeros(2, classes, dtype=torch.float64, device=device)

    def add(self, model: Any, classes: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add one batch. ``classes``: each row's class index, on the CPU (grouping rows there costs no GPU wait)."""
        for index in classes.unique().tolist():
            rows = (classes == index).nonzero().squeeze(1).to(logits.device)
            self.sums[0, index] += model.loss(logits[rows], targets[rows]).double()
            self.sums[1, index] += model.loss_units(targets[rows]).double()

    def means(self, names: list[str]) -> dict[str, float]:
        """Each class with held-out examples: its mean loss, rounded to 6 decimals (what certificates state)."""
        loss, units = self.sums.cpu()
        return {names[c]: round(float(loss[c] / units[c]), 6) for c in range(len(names)) if units[c] > 0}
