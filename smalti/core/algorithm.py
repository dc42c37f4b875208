"""The base class every efficiency method implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smalti.core.event import Event
from smalti.core.state import State

if TYPE_CHECKING:
    from smalti.core.logger import Logger


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
    # What the method changes, declared to the engine and written to the run directory
    # (``algorithms.json``), so a run's record says what really happened: "model" (surgery),
    # "batch" (inputs, targets, provenance, or which rows train), "loss", "gradients", "weights"
    # (outside the optimizer step), "learning_rate".
    changes: frozenset[str] = frozenset()
    # False: the method computes gradients outside the routed backward pass, so it cannot run while
    # routing or the ledger is on (the trainer refuses such a recipe, naming the method).
    routing_safe: bool = True
    # True: the method reads or rewrites gradients, so it cannot see loss-scaled (amp_fp16) ones.
    needs_unscaled_gradients: bool = False

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

    def describe(self) -> dict[str, Any]:
        """What the run directory records about this method: its name, settings and declared changes."""
        settings = {k: v for k, v in vars(self).items() if not k.startswith("_") and _plain(v)}
        return {"name": self.name, "changes": sorted(self.changes), "settings": settings}

    def __repr__(self) -> str:
        return f"{self.name}()"


def _plain(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, type(None))) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value)
    )
