"""Metrics as JSON lines in the run directory, one record per log call, stamped with its Time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Mapping

from smalti.core.state import State
from smalti.core.time import Timestamp
from smalti.loggers.logger import Logger, LoggerDestination


class JSONLLogger(LoggerDestination):
    """Writes ``RUN_DIR/metrics.jsonl``.

    The file's length at each checkpoint is saved with it; a resumed run cuts
    the file back to that length first, so lines written after the
    checkpoint by the killed process are replaced, never duplicated.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._offset = 0
        self._handle: IO[str] | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        self._open()

    def _open(self) -> IO[str]:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            with open(self.path, "r+b") as raw:
                raw.truncate(self._offset)
            # Line-buffered: each record reaches the file as it is logged (`tail -f` follows a run live;
            # a killed process loses no line it logged), at one write per record.
            self._handle = open(self.path, "a", encoding="utf-8", buffering=1)
        return self._handle

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        record: dict[str, float] = {
            "ep": timestamp.epoch,
            "ba": timestamp.batch,
            "sp": timestamp.sample,
            "tok": timestamp.token,
        }
        record.update(metrics)
        self._open().write(json.dumps(record) + "\n")

    def state_dict(self) -> dict[str, Any]:
        handle = self._open()
        handle.flush()
        return {"offset": handle.tell()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._handle is not None:
            raise RuntimeError("JSONLLogger state must be loaded before the file is opened")
        self._offset = int(state["offset"])

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._handle is not None:
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file, in order."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
