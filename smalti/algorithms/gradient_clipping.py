"""GradientClipping: by norm, by value, or adaptive (per unit, relative to the weights)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.functional.gradient_clipping import apply_gradient_clipping
from smalti.core.logger import Logger


class GradientClippingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clipping_type: Literal["norm", "value", "adaptive"] = "adaptive"
    clipping_threshold: float = Field(0.01, gt=0.0)


class GradientClipping(Algorithm):
    """Clip gradients before the optimizer step.

    Method card
        What: ``norm`` scales all gradients so their global norm is at most the threshold;
        ``value`` clamps each entry; ``adaptive`` (AGC) scales each unit's (row's) gradient down to
        ``threshold * ||w_unit||``.
        When it helps: spikes and divergence (norm); training without batch norm at large batch
        (adaptive, the NFNet recipe). When it hurts: a threshold too low slows learning.
        Hyperparameters: adaptive 0.01 (NFNets: 0.01-0.16), norm 1.0.
        Source: Pascanu et al. 2013 (norm); Brock et al., "High-Performance Large-Scale Image
        Recognition Without Normalization", 2021 (adaptive).
        Governance: ``value`` and ``adaptive`` act per parameter, so they run under routing; a global
        ``norm`` would let one class's gradient rescale another's, so under routing use
        ``train.grad_clip_norm``, which the router clips per cell.
        Measured in Smalti: functional forms match hand computations (tests).

    Runs after ``train.grad_clip_norm`` would not be right: it runs on ``BEFORE_OPTIMIZER_STEP``,
    before the trainer's own clipping.
    """

    changes = frozenset({"gradients"})
    needs_unscaled_gradients = True

    def __init__(self, clipping_type: str = "adaptive", clipping_threshold: float = 0.01) -> None:
        config = GradientClippingConfig(clipping_type=clipping_type, clipping_threshold=clipping_threshold)
        self.clipping_type, self.clipping_threshold = config.clipping_type, config.clipping_threshold

    @property
    def routing_safe(self) -> bool:  # type: ignore[override]
        return self.clipping_type != "norm"

    def match(self, event: Event, state: State) -> bool:
        return event is Event.BEFORE_OPTIMIZER_STEP

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        apply_gradient_clipping(state.model.parameters(), self.clipping_type, self.clipping_threshold)
