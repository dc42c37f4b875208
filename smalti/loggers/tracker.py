"""What the experiment-tracker destinations (TensorBoard, Weights & Biases) share: they are views, never evidence.

A tracker is someone else's software talking to someone else's disk or server, so it must never stop or change
training: every call into it goes through :meth:`TrackerDestination._guard`, and the first failure prints one
warning and switches that tracker off for the rest of the run. Nothing a tracker does feeds back into the loop
(no random numbers drawn, no tensors touched), which is why a failing tracker leaves the weights bitwise those of
a run without it (tested).

Beside the loss, trackers receive the governance signals the ledger computes (:mod:`smalti.loggers.governance`)
through :meth:`log_governance`, stamped with the step they describe.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Mapping

from smalti.core.state import State
from smalti.core.time import Timestamp
from smalti.loggers.logger import Logger, LoggerDestination


class TrackerDestination(LoggerDestination):
    """A destination whose failures are contained. Subclasses implement the ``_``-prefixed hooks."""

    tracker = "tracker"  # the name a warning gives
    shows_governance = True

    def __init__(self) -> None:
        self.failed = False
        self._resumed_at: int | None = None  # the batch a resumed run continues after (None: a fresh run)

    def _guard(self, call: Callable[[], Any], default: Any = None) -> Any:
        if self.failed:
            return default
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - whatever the tracker raises, training goes on
            self.failed = True
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            print(
                f"smalti: warning: {self.tracker} logging failed ({reason}); training continues without it "
                "(the ledger and metrics.jsonl are unaffected)",
                file=sys.stderr,
                flush=True,
            )
            self._guard_close()
            return default

    def _guard_close(self) -> None:
        try:
            self._close()
        except Exception:  # noqa: BLE001 - already failed; one warning is enough
            pass

    # ---------------------------------------------------------------- events, each guarded

    def fit_start(self, state: State, logger: Logger) -> None:
        self._guard(lambda: self._start(state))

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        self._guard(lambda: self._write(dict(metrics), timestamp.batch))

    def log_governance(self, step: int, metrics: Mapping[str, float]) -> None:
        self._guard(lambda: self._write(dict(metrics), step))

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        self._guard(lambda: self._commit(state.timestamp.batch))

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        self._guard(lambda: self._commit(state.timestamp.batch))

    def fit_end(self, state: State, logger: Logger) -> None:
        self._guard(lambda: self._commit(state.timestamp.batch))

    def state_dict(self) -> dict[str, Any]:
        return self._guard(self._state, default={}) or {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._guard(lambda: self._load(state))

    def resumed_at(self, batch: int) -> None:
        """The trainer resumed from a checkpoint taken after ``batch``: anything a killed process logged past it
        is replaced, never repeated."""
        self._resumed_at = batch

    def close(self) -> None:
        if not self.failed:
            self._guard(self._close)

    # ---------------------------------------------------------------- what a tracker implements

    def _start(self, state: State) -> None: ...

    def _write(self, metrics: dict[str, float], step: int) -> None: ...

    def _commit(self, step: int) -> None:
        """Everything up to ``step`` is covered by a checkpoint on disk."""

    def _state(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None: ...

    def _close(self) -> None: ...
