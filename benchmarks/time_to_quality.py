"""Shared by the time-to-quality benchmarks: train a recipe, record training time against eval quality.

"Time" is training wall time only: the seconds spent evaluating are taken
out (both arms evaluate on the same schedule, but a stack with a shorter
budget evaluates fewer times). Start-up (data, model) is not counted either.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import common  # noqa: F401  (puts the repository on sys.path)

from smalti.config import Recipe
from smalti.core.callback import Callback
from smalti.trainer import Trainer


class TrainClock(Callback):
    """Training seconds (evaluation excluded) at every evaluation, with the metrics of that evaluation."""

    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, float]]] = []
        self._start = 0.0
        self._eval_seconds = 0.0
        self._eval_started = 0.0
        self._trained = 0.0

    def fit_start(self, state, logger) -> None:
        self._start = time.perf_counter()

    def eval_start(self, state, logger) -> None:
        self._eval_started = time.perf_counter()
        self._trained = self._eval_started - self._start - self._eval_seconds

    def eval_end(self, state, logger) -> None:
        self._eval_seconds += time.perf_counter() - self._eval_started
        self.points.append((self._trained, dict(state.eval_metrics)))


@dataclass
class Curve:
    name: str
    points: list[tuple[float, dict[str, float]]]
    extra: dict[str, Any] = field(default_factory=dict)

    def final(self, metric: str) -> float:
        return self.points[-1][1][metric]

    def time_to(self, metric: str, target: float, higher_is_better: bool) -> float | None:
        for seconds, metrics in self.points:
            value = metrics[metric]
            if (value >= target) if higher_is_better else (value <= target):
                return seconds
        return None


def train_curve(name: str, recipe: Recipe) -> Curve:
    clock = TrainClock()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(recipe, run_dir, callbacks=[clock])
        try:
            trainer.fit()
        finally:
            trainer.close()
    return Curve(name, clock.points)


def fastest_to_target(curves: list[Curve], metric: str, target: float, higher_is_better: bool) -> tuple[float | None, str | None]:
    """The shortest time any of ``curves`` (one stack at several budgets) took to reach the target."""
    reached = [(t, c.name) for c in curves if (t := c.time_to(metric, target, higher_is_better)) is not None]
    return min(reached) if reached else (None, None)


def median_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if len(present) == len(values) and present else None


def budget_recipes(make: Callable[[float], Recipe], budgets: list[float]) -> list[tuple[str, Recipe]]:
    return [(f"{budget:g}x", make(budget)) for budget in budgets]
