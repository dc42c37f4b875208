"""What algorithms and callbacks log through: a fan-out from the loop to wherever metrics go.

The destinations themselves (console, JSONL, MLflow, trackers) live in ``smalti.loggers``; the loop knows them
only as ``Destination``, so that ``smalti.core`` imports nothing above it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import torch

from smalti.core.time import Timestamp

if TYPE_CHECKING:
    from smalti.core.state import State


class Destination(Protocol):
    """A place metrics are written to (``smalti.loggers.logger.LoggerDestination`` implements it)."""

    shows_governance: bool  # a tracker shows the ledger's governance signals beside the loss

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None: ...

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None: ...

    def log_governance(self, step: int, metrics: Mapping[str, float]) -> None: ...

    # A destination is also a callback (``smalti.core.callback.Callback``): the engine runs and closes it.
    def handlers(self) -> dict[Any, Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class Logger:
    """What algorithms and callbacks log through.

    Values may be tensors: they are converted to floats here, once, and only
    if some destination will write them (on non-zero ranks there is none, so
    logging costs nothing there and forces no device sync).
    """

    def __init__(self, state: "State", destinations: Sequence[Destination] = ()) -> None:
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
        return any(getattr(d, "shows_governance", False) for d in self.destinations)
