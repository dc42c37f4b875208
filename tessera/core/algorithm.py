"""The base class every efficiency method implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tessera.core.event import Event
from tessera.core.state import State

if TYPE_CHECKING:
    from tessera.loggers.logger import Logger


class Algorithm:
    """A training-efficiency method: decides when to act, then acts.

    Subclasses implement ``match`` (cheap; called on every event) and
    ``apply``. Any state that must survive a resume goes in ``state_dict``;
    the trainer checkpoints it under the algorithm's ``name``.

    ``order`` positions the algorithm among the others on regular events
    (lower runs first; the ``AFTER_*`` events reverse it). Use it only for a
    real dependency and say which in the class docstring.
    """

    order: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def match(self, event: Event, state: State) -> bool:
        raise NotImplementedError

    def apply(self, event: Event, state: State, logger: "Logger") -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state but the checkpoint has {sorted(state)}")

    def __repr__(self) -> str:
        return f"{self.name}()"
