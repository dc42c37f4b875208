"""Callbacks observe the loop; they do not change what the model learns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from smalti.core.event import Event
from smalti.core.state import State

if TYPE_CHECKING:
    from smalti.core.logger import Logger

Handler = Callable[[State, "Logger"], None]


class Callback:
    """Override a method named after an event (``batch_end``, ``fit_start``...).

    The engine looks the overridden methods up once, so an event a callback
    does not handle costs nothing on the hot path.
    """

    def handlers(self) -> dict[Event, Handler]:
        found: dict[Event, Handler] = {}
        for event in Event:
            method = getattr(self, event.value, None)
            if callable(method):
                found[event] = method
        return found

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release files and connections; called once, also after a failure."""
