"""EMA: evaluate with an exponential moving average of the weights."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.core.time import Time
from smalti.functional.ema import compute_ema, ema_smoothing
from smalti.core.logger import Logger


class EMAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    half_life: str = "100ba"
    update_interval: str = "1ba"
    start: str = "0dur"

    @field_validator("half_life", "update_interval", "start", mode="before")
    @classmethod
    def _time(cls, value: Any) -> str:
        return str(Time.parse(value))


class EMA(Algorithm):
    """Keep an exponential moving average of the weights and evaluate with it.

    Method card
        What: after every ``update_interval``, ``avg = s * avg + (1 - s) * w``
        with ``s = 0.5 ** (update_interval / half_life)``, for the parameters and the
        floating buffers (batch-norm statistics), as Composer does; integer buffers
        are copied. Evaluation (and ``smalti sample``) uses the average; training
        continues on ``w``.
        When it helps: noisy late training, high learning rates; often a
        free 0.1-0.5 point gain in vision and a smoother LM validation curve.
        When it hurts: very short runs (the average lags the weights), and
        memory-bound models (one extra copy of the weights).
        Hyperparameters: ``half_life`` around 1-5% of training
        (e.g. ``100ba`` for a few thousand batches); ``update_interval 1ba``.
        Source: Polyak & Juditsky 1992; used as in Kaddour et al., "Stop
        Wasting My Time! Saving Days of ImageNet and BERT Training with
        Latest Weight Averaging", 2022.
        Measured in Smalti: see docs/benchmarks.md (not yet measured).

    Runs after other algorithms on ``BATCH_END`` (``order = 100``) so that
    it averages the weights every other algorithm has finished changing.
    The weights are swapped in on ``EVAL_START`` and back, bitwise, on
    ``EVAL_END``.
    """

    order = 100

    def __init__(self, half_life: str = "100ba", update_interval: str = "1ba", start: str = "0dur") -> None:
        config = EMAConfig(half_life=half_life, update_interval=update_interval, start=start)
        self.half_life = Time.parse(config.half_life)
        self.update_interval = Time.parse(config.update_interval)
        self.start = Time.parse(config.start)
        self.averages: dict[str, torch.Tensor] = {}
        self._stash: list[torch.Tensor] | None = None
        self._smoothing: float | None = None

    def _tensors(self, state: State) -> list[tuple[str, torch.Tensor]]:
        """Parameters and buffers: the state an evaluation reads."""
        return list(state.model.named_parameters()) + list(state.model.named_buffers())

    def match(self, event: Event, state: State) -> bool:
        if event is Event.BATCH_END:
            return state.reached(self.start) and state.due_at_batch_end(self.update_interval)
        return event in (Event.FIT_START, Event.EVAL_START, Event.EVAL_END)

    @torch.no_grad()
    def apply(self, event: Event, state: State, logger: Logger) -> None:
        parameters = self._tensors(state)
        if event is Event.FIT_START:
            self._smoothing = ema_smoothing(state.batches_in(self.update_interval), state.batches_in(self.half_life))
            if not self.averages:
                self.averages = {name: p.detach().clone() for name, p in parameters}
        elif event is Event.BATCH_END:
            assert self._smoothing is not None
            compute_ema([self.averages[n] for n, _ in parameters], [p for _, p in parameters], self._smoothing)
        elif event is Event.EVAL_START:
            self._stash = [p.detach().clone() for _, p in parameters]
            for name, p in parameters:
                p.copy_(self.averages[name])
        elif event is Event.EVAL_END and self._stash is not None:
            for (_, p), saved in zip(parameters, self._stash):
                p.copy_(saved)
            self._stash = None

    def state_dict(self) -> dict[str, Any]:
        return {"averages": dict(self.averages)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averages = {name: tensor.clone() for name, tensor in state["averages"].items()}
