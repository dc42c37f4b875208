"""LayerFreezing: stop training the bottom layers progressively, as routing rules."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tessera.core.algorithm import Algorithm
from tessera.core.event import Event
from tessera.core.state import State
from tessera.core.time import Time, TimeUnit
from tessera.functional.layer_freezing import freeze_times, freezing_units
from tessera.governance.policy import Rule
from tessera.loggers.logger import Logger


class LayerFreezingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    freeze_start: float = Field(0.5, ge=0.0, lt=1.0)
    freeze_level: float = Field(1.0, ge=0.0, le=1.0)


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
        Measured in Tessera: not yet measured.

    Tessera implements freezing as deny rules for every class, compiled into
    the routing allow-matrix with any governance policy (the freezing rules
    come first, so nothing the policy allows can unfreeze a layer). It does
    not act on events itself: the router enforces the schedule.
    """

    def __init__(self, freeze_start: float = 0.5, freeze_level: float = 1.0) -> None:
        config = LayerFreezingConfig(freeze_start=freeze_start, freeze_level=freeze_level)
        self.freeze_start, self.freeze_level = config.freeze_start, config.freeze_level

    def routing_rules(self, model) -> list[Rule]:
        units = freezing_units(model)
        rules = []
        for unit, start in zip(units, freeze_times(len(units), self.freeze_start, self.freeze_level)):
            if start is not None:
                phase = (Time(start, TimeUnit.DURATION), Time(1.0, TimeUnit.DURATION))
                rules.append(Rule(classes=("*",), params=(unit,), action="deny", phase=phase, name=f"freeze {unit}"))
        return rules

    def match(self, event: Event, state: State) -> bool:
        return False

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        pass
