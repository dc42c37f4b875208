"""The console: a live progress bar in a terminal, plain lines elsewhere, a summary at the end."""

from __future__ import annotations

import math
import sys
import time
from typing import Literal, Mapping

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from smalti.core.state import State
from smalti.core.time import Timestamp
from smalti.loggers.logger import Logger, LoggerDestination


def _format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ConsoleLogger(LoggerDestination):
    """Shows loss, tokens/s and ETA while training; evaluation results as they come.

    ``mode``: ``bar`` (a live bar), ``lines`` (a line every ~5% of training,
    for logs and CI), ``off`` (evaluation results only), ``auto`` (a bar in a
    terminal, lines otherwise).
    """

    def __init__(self, mode: Literal["auto", "bar", "lines", "off"] = "auto", console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stderr)
        self.mode = ("bar" if self.console.is_terminal else "lines") if mode == "auto" else mode
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._loss = math.nan
        self._total = 1
        self._start_batch = 0
        self._start_tokens = 0
        self._start_time = 0.0
        self._line_every = 1

    def fit_start(self, state: State, logger: Logger) -> None:
        self._total = max(1, math.ceil(state.batches_in(state.max_duration)))
        self._start_batch = state.timestamp.batch
        self._start_tokens = state.timestamp.token
        self._start_time = time.perf_counter()
        self._line_every = max(1, self._total // 20)
        if state.timestamp.batch:
            self.console.print(f"resuming at {state.timestamp.describe()}")
        if self.mode == "bar":
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("ba {task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                refresh_per_second=4,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=self._total, completed=state.timestamp.batch, loss="-", rate="-"
            )

    def log_metrics(self, metrics: Mapping[str, float], timestamp: Timestamp) -> None:
        if "train/loss" in metrics:
            self._loss = metrics["train/loss"]
        evals = {k: v for k, v in metrics.items() if k.startswith("eval/")}
        if evals:
            text = "  ".join(f"{k} {v:.4f}" for k, v in evals.items())
            self.console.print(f"[ep{timestamp.epoch} ba{timestamp.batch}] {text}", markup=False, highlight=False)

    def _rate(self, state: State) -> float:
        elapsed = time.perf_counter() - self._start_time
        return (state.timestamp.token - self._start_tokens) / elapsed if elapsed > 0 else 0.0

    def batch_end(self, state: State, logger: Logger) -> None:
        done = state.timestamp.batch
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task, completed=done, loss=f"{self._loss:.4f}", rate=f"{self._rate(state):,.0f}"
            )
        elif self.mode == "lines" and (done % self._line_every == 0 or done == self._total):
            elapsed = time.perf_counter() - self._start_time
            fresh = done - self._start_batch
            eta = elapsed / fresh * (self._total - done) if fresh else 0.0
            self.console.print(
                f"[ep{state.timestamp.epoch} ba{done}/{self._total}] loss {self._loss:.4f}  "
                f"{self._rate(state):,.0f} tok/s  elapsed {_format_duration(elapsed)}  eta {_format_duration(eta)}",
                highlight=False,
                markup=False,
            )

    def fit_end(self, state: State, logger: Logger) -> None:
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
