"""Fan-out from the loop to wherever metrics go (console, JSONL, MLflow, TensorBoard, Weights & Biases)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from smalti.core.callback import Callback
from smalti.core.time import Timestamp

if TYPE_CHECKING:
    from smalti.core.state import State


class LoggerDestination(Callback):
    """A place metrics are written to. Every record is stamped with its Time."""

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        pass

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        pass

    def log_governance(self, step: int, metrics: Mapping[str, float]) -> None:
        """Governance signals of an earlier ``step`` (the ledger computes them in batches); trackers only."""


class Logger:
    """What algorithms and callbacks log through.

    Values may be tensors: they are converted to floats here, once, and only
    if some destination will write them (on non-zero ranks there is none, so
    logging costs nothing there and forces no device sync).
    """

    def __init__(self, state: "State", destinations: Sequence[LoggerDestination] = ()) -> None:
        self._state = state
        self.destinations = list(destinations)

    def log_metrics(self, metrics: Mapping[str, float | torch.Tensor]) -> None:
        if not self.destinations:
            return
        values = {k: float(v) for k, v in metrics.items()}
        timestamp = self._state.timestamp
        for destination in self.destinations:
            destination.log_metrics(values, timestamp)

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        for destination in self.destinations:
            destination.log_hyperparameters(params)

    def log_governance(self, step: int, metrics: Mapping[str, float]) -> None:
        for destination in self.destinations:
            destination.log_governance(step, metrics)

    @property
    def wants_governance(self) -> bool:
        """Whether a destination shows governance signals (so the trainer computes them only then)."""
        from smalti.loggers.tracker import TrackerDestination

        return any(isinstance(d, TrackerDestination) for d in self.destinations)
