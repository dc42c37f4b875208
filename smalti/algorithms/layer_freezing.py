"""LayerFreezing: stop training the bottom layers progressively, as routing rules."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.core.time import Time, TimeUnit
from smalti.functional.layer_freezing import freeze_times, freezing_units, settled, unit_entropies
from smalti.trust.policy import Rule
from smalti.core.logger import Logger


class LayerFreezingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["schedule", "entropy"] = Field(
        "schedule",
        description="schedule: Composer's bottom-up schedule; entropy: freeze each layer once its entropy settles",
    )
    freeze_start: float = Field(0.5, ge=0.0, lt=1.0)
    freeze_level: float = Field(1.0, ge=0.0, le=1.0)
    tolerance: float = Field(0.01, gt=0.0, description="entropy: largest relative change that counts as settled")
    patience: int = Field(2, ge=1, description="entropy: consecutive settled profiles before a layer freezes")


class LayerFreezing(Algorithm):
    """Freeze the model's layers bottom-up over the second part of training.

    Method card
        What: from ``freeze_start`` (a fraction of training) on, freeze a
        growing share of the layers, embeddings first, reaching
        ``freeze_level`` of them at the end. A frozen layer receives no
        gradient; the backward pass stops below the lowest unfrozen layer,
        so late steps are cheaper.
        When it helps: long fine-tunes and late training, where lower layers
        have settled; Composer reports modest speedups on ResNets.
        When it hurts: short runs and tasks whose early features must keep
        adapting; it changes the final model, so check quality.
        Hyperparameters: ``freeze_start`` 0.5, ``freeze_level`` 1.0.
        Source: Brock et al., "FreezeOut: Accelerate Training by
        Progressively Freezing Layers", 2017; Composer's LayerFreezing.
        Measured in Smalti: see docs/algorithms.md.

    Smalti implements freezing as deny rules for every class, compiled into
    the routing allow-matrix with any governance policy (the freezing rules
    come first, so nothing the policy allows can unfreeze a layer). With the
    schedule it does not act on events itself: the router enforces it.

    ``mode: entropy`` (needs the ledger with ``entropy_every`` > 0) freezes a
    layer (a unit of ``freezing_units``) once its spectral entropy on the
    ledger's probe has changed by at most ``tolerance`` (relative) for
    ``patience`` consecutive profiles: what it represents has settled. A
    layer the policy explicitly allows some class to update is never frozen
    (the policy says it must keep learning). Decisions are made from the
    profile the ledger records, take effect from the next step, and are
    checkpointed and replayed on resume.
    """

    changes = frozenset({"gradients"})

    def __init__(
        self,
        mode: str = "schedule",
        freeze_start: float = 0.5,
        freeze_level: float = 1.0,
        tolerance: float = 0.01,
        patience: int = 2,
    ) -> None:
        config = LayerFreezingConfig(
            mode=mode, freeze_start=freeze_start, freeze_level=freeze_level, tolerance=tolerance, patience=patience
        )
        self.mode, self.freeze_start, self.freeze_level = config.mode, config.freeze_start, config.freeze_level
        self.tolerance, self.patience = config.tolerance, config.patience
        self._previous: dict[str, float] = {}
        self._streak: dict[str, int] = {}
        self._frozen: dict[str, int] = {}  # unit -> the last step that updated it

    def routing_rules(self, model) -> list[Rule]:
        if self.mode == "entropy":
            return []
        units = freezing_units(model)
        rules = []
        for unit, start in zip(units, freeze_times(len(units), self.freeze_start, self.freeze_level)):
            if start is not None:
                phase = (Time(start, TimeUnit.DURATION), Time(1.0, TimeUnit.DURATION))
                rules.append(Rule(classes=("*",), params=(unit,), action="deny", phase=phase, name=f"freeze {unit}"))
        return rules

    def match(self, event: Event, state: State) -> bool:
        if self.mode != "entropy":
            return False
        if event is Event.FIT_START:
            return True
        profile = state.entropy_profile
        return event is Event.BATCH_END and profile is not None and profile[0] == state.timestamp.batch

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        router = state.governance
        if event is Event.FIT_START:
            if router is None or not hasattr(router, "freeze"):
                raise ValueError(
                    "layer_freezing mode 'entropy' needs the ledger's entropy profiles: "
                    "set governance.ledger.enabled and governance.ledger.entropy_every > 0"
                )
            for unit, batch in self._frozen.items():  # a resumed run: the same freezing as before the crash
                router.freeze(self._unit_parameters(router, unit), batch)
            return
        assert state.entropy_profile is not None
        step, layer_names, entropies = state.entropy_profile
        units = freezing_units(state.model)
        protected = router.protected_parameters()
        for unit, value in unit_entropies(units, layer_names, entropies).items():
            if unit in self._frozen:
                continue
            previous = self._previous.get(unit)
            self._streak[unit] = (
                self._streak.get(unit, 0) + 1
                if previous is not None and settled(previous, value, self.tolerance)
                else 0
            )
            self._previous[unit] = value
            parameters = self._unit_parameters(router, unit)
            if self._streak[unit] >= self.patience and parameters and not set(parameters) & protected:
                self._frozen[unit] = step  # the router counts completed batches: every step after ``step``
                router.freeze(parameters, step)
                logger.log_metrics({f"layer_freezing/frozen_after_step/{unit}": float(step)})

    @staticmethod
    def _unit_parameters(router, unit: str) -> list[str]:
        return [n for n in router.names if n == unit or n.startswith(unit + ".")]

    def state_dict(self) -> dict[str, Any]:
        if self.mode != "entropy":
            return {}
        return {"previous": dict(self._previous), "streak": dict(self._streak), "frozen": dict(self._frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._previous = dict(state.get("previous", {}))
        self._streak = dict(state.get("streak", {}))
        self._frozen = dict(state.get("frozen", {}))
