"""Fan-out from the loop to wherever metrics go (console, JSONL, MLflow)."""

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
