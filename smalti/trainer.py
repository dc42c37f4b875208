"""``Trainer``: the training loop with governance plugged into its step seam.

The loop itself is ``smalti/train/loop.py`` (read it top to bottom); it knows nothing of routing or the ledger.
This module is where the two meet: ``Trainer`` is ``TrainingLoop`` built with ``smalti.governance.step``'s seam
factory, which reads the recipe's policy and ledger sections (and a fine-tune's parent) and returns the plain,
routed or ledgered step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from smalti.config import Recipe
from smalti.core.algorithm import Algorithm
from smalti.core.callback import Callback
from smalti.data.lm import LanguageModelData
from smalti.governance.step import governed_step
from smalti.train.loop import EVIDENCE, FitResult, TrainingLoop

__all__ = ["EVIDENCE", "FitResult", "Trainer"]


class Trainer(TrainingLoop):
    """Trains the model a recipe describes, governed as the recipe says, resuming from the run directory if it
    can. ``model`` and ``data`` default to what the recipe builds (see ``TrainingLoop``)."""

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        model: torch.nn.Module | None = None,
        data: LanguageModelData | None = None,
        algorithms: Sequence[Algorithm] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        super().__init__(
            recipe, run_dir, model=model, data=data, algorithms=algorithms, callbacks=callbacks, seam=governed_step
        )

    def __enter__(self) -> "Trainer":
        return self

    @property
    def router(self) -> Any:
        """The routing of a governed run (None without a policy, routing rules or the ledger)."""
        return getattr(self.seam, "router", None)

    @property
    def ledger(self) -> Any:
        """The ledger of a ledgered run (None otherwise)."""
        return getattr(self.seam, "ledger", None)

    @property
    def policy(self) -> Any:
        """The signed routing policy (None without one)."""
        return getattr(self.seam, "policy", None)
