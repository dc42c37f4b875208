"""SelectiveBackprop: train each step on the examples the model finds hardest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.functional.selective_backprop import select_by_loss, should_select
from smalti.core.logger import Logger


class SelectiveBackpropConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    start: float = Field(0.5, ge=0.0, le=1.0, description="fraction of training where selection begins")
    end: float = Field(0.9, ge=0.0, le=1.0, description="... and ends")
    keep: float = Field(0.5, gt=0.0, le=1.0, description="fraction of each batch trained on")
    scale_factor: float = Field(1.0, gt=0.0, le=1.0, description="images: score on a downscaled copy")
    interrupt: int = Field(2, ge=0, description="every interrupt-th batch trains on everything (0: never)")

    @model_validator(mode="after")
    def _ordered(self) -> "SelectiveBackpropConfig":
        if self.end < self.start:
            raise ValueError(f"end ({self.end}) must not come before start ({self.start})")
        return self


class SelectiveBackprop(Algorithm):
    """Score the batch without gradients, then train only on a loss-weighted sample of it.

    Method card
        What: between ``start`` and ``end``, a no-grad forward ranks the examples by loss; ``keep``
        of them are drawn with probability proportional to ``percentile ** (1 / keep - 1)`` and
        trained on (as Composer); every ``interrupt``-th batch of an epoch trains on all rows.
        Governance: the examples left out are recorded by the ledger as not contributing to that
        step (their ids, per class), so the record says what the model really learned from.
        When it helps: forward passes much cheaper than backward passes; data with many easy
        examples (the paper: up to 3.5x faster to target error). When it hurts: the scoring pass
        costs a forward; batch-norm statistics see only the kept rows.
        Hyperparameters: ``keep`` 0.5, ``start`` 0.5, ``end`` 0.9, ``interrupt`` 2.
        Source: Jiang et al., "Accelerating Deep Learning by Focusing on the Biggest Losers", 2019.
        Measured in Smalti: see docs/algorithms.md.
    """

    changes = frozenset({"batch"})
    order = 50  # after every other batch transform: it scores the rows as they will be trained

    def __init__(
        self, start: float = 0.5, end: float = 0.9, keep: float = 0.5, scale_factor: float = 1.0, interrupt: int = 2
    ) -> None:
        config = SelectiveBackpropConfig(
            start=start, end=end, keep=keep, scale_factor=scale_factor, interrupt=interrupt
        )
        self.start, self.end, self.keep = config.start, config.end, config.keep
        self.scale_factor, self.interrupt = config.scale_factor, config.interrupt

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_DATALOADER and should_select(
            state.timestamp.batch_in_epoch, state.elapsed_fraction, self.start, self.end, self.interrupt
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch, model = state.batch, state.model
        assert batch is not None
        inputs = batch.inputs
        if self.scale_factor < 1.0 and inputs.dim() == 4:
            inputs = F.interpolate(inputs, scale_factor=self.scale_factor, mode="bilinear", align_corners=False)
        was_training = model.training
        model.eval()  # scoring must not move batch-norm statistics
        try:
            with torch.no_grad():
                # Module.__getattr__ types the model's loss methods as Tensor | Module
                losses = model.example_losses(model(inputs), batch.targets)  # type: ignore[operator]
        finally:
            model.train(was_training)
        state.batch = batch.select(select_by_loss(losses, self.keep).cpu())
