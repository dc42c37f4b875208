"""Runs algorithms, then callbacks, then loggers on each event."""

from __future__ import annotations

from typing import Sequence

from smalti.core.algorithm import Algorithm
from smalti.core.callback import Callback, Handler
from smalti.core.event import Event
from smalti.core.passes import DEFAULT_PASSES, AlgorithmPass, order_for_event
from smalti.core.state import State
from smalti.core.logger import Logger
from smalti.io import Closing


class Engine(Closing):
    """The single place that decides who acts on an event, and in what order.

    The per-event order is computed once (the passes are pure functions of
    the algorithm list and the event), so firing an event nobody listens to
    costs a dictionary lookup and an empty loop.
    """

    def __init__(
        self,
        state: State,
        logger: Logger,
        algorithms: Sequence[Algorithm] = (),
        callbacks: Sequence[Callback] = (),
        passes: Sequence[AlgorithmPass] = DEFAULT_PASSES,
    ) -> None:
        self.state = state
        self.logger = logger
        self.algorithms = list(algorithms)
        self.callbacks = list(callbacks) + list(logger.destinations)
        names = [a.name for a in self.algorithms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"algorithm listed more than once: {', '.join(duplicates)}")
        self._algorithm_order = {e: order_for_event(self.algorithms, e, passes) for e in Event}
        self._handlers: dict[Event, list[Handler]] = {e: [] for e in Event}
        for callback in self.callbacks:
            for event, handler in callback.handlers().items():
                self._handlers[event].append(handler)

    def run(self, event: Event) -> None:
        state, logger = self.state, self.logger
        for algorithm in self._algorithm_order[event]:
            if algorithm.match(event, state):
                algorithm.apply(event, state, logger)
        for handler in self._handlers[event]:
            handler(state, logger)

    def close(self) -> None:
        for callback in self.callbacks:
            callback.close()
