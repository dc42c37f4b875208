"""The base of every place metrics go (console, JSONL, MLflow, TensorBoard, Weights & Biases).

``Logger``, the fan-out the loop calls, is ``smalti.core.logger.Logger`` (still importable from here)."""

from __future__ import annotations

from typing import Any, Mapping

from smalti.core.callback import Callback
from smalti.core.logger import Logger
from smalti.core.time import Timestamp

__all__ = ["Logger", "LoggerDestination"]


class LoggerDestination(Callback):
    """A place metrics are written to. Every record is stamped with its Time."""

    shows_governance = False  # trackers set it: the loop computes governance signals only for them

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        pass

    def log_hyperparameters(self, params: Mapping[str, Any]) -> None:
        pass

    def log_governance(self, step: int, metrics: Mapping[str, float]) -> None:
        """Governance signals of an earlier ``step`` (the ledger computes them in batches); trackers only."""
