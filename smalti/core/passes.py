"""Ordering passes: small explicit functions that decide the algorithm order per event.

The engine applies ``DEFAULT_PASSES`` in sequence to the algorithm list,
once per event, and caches the result. Each pass is a pure function of the
list and the event, so each can be tested alone.
"""

from __future__ import annotations

from typing import Callable, Sequence

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event

AlgorithmPass = Callable[[Sequence[Algorithm], Event], list[Algorithm]]


def sort_by_order(algorithms: Sequence[Algorithm], event: Event) -> list[Algorithm]:
    """Stable sort by each algorithm's declared ``order`` (lower first); ties keep recipe order."""
    return sorted(algorithms, key=lambda algorithm: algorithm.order)


def reverse_after_events(algorithms: Sequence[Algorithm], event: Event) -> list[Algorithm]:
    """``AFTER_*`` events run last-in, first-out, so each algorithm can undo its own change."""
    return list(reversed(algorithms)) if event.is_after_event else list(algorithms)


DEFAULT_PASSES: tuple[AlgorithmPass, ...] = (sort_by_order, reverse_after_events)


def order_for_event(
    algorithms: Sequence[Algorithm], event: Event, passes: Sequence[AlgorithmPass] = DEFAULT_PASSES
) -> list[Algorithm]:
    ordered = list(algorithms)
    for algorithm_pass in passes:
        ordered = algorithm_pass(ordered, event)
    return ordered
