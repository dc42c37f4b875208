"""Learning-rate schedules in Time units (the optimizers themselves: ``smalti.optimizers``)."""

from __future__ import annotations

import math
from typing import Any


from smalti.config import SchedulerConfig
from smalti.core.state import State
from smalti.core.time import Time


class LRSchedule:
    """Linear warmup, then cosine, linear or constant decay; a pure function of the timestamp.

    Because the learning rate is recomputed from ``State`` before every batch,
    there is no step counter to drift, and a resumed run gets the same rate.
    """

    def __init__(self, config: SchedulerConfig, base_lr: float) -> None:
        self.name = config.name
        self.warmup = Time.parse(config.warmup)
        self.final_fraction = config.final_lr_fraction
        self.base_lr = base_lr

    def factor(self, state: State) -> float:
        done = state.timestamp.batch
        total = state.batches_in(state.max_duration)
        warmup = state.batches_in(self.warmup)
        if done < warmup:
            return (done + 1) / warmup
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (done - warmup) / max(1.0, total - warmup))
        if self.name == "linear":
            return 1.0 - (1.0 - self.final_fraction) * progress
        return self.final_fraction + (1.0 - self.final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, state: State) -> float:
        """Every group's rate, scaled alike; a group with a base rate of its own (Muon's AdamW) keeps its ratio."""
        factor = self.factor(state)
        lr = self.base_lr * factor
        for group in state.optimizer.param_groups:
            group["lr"] = group.get("base_lr", self.base_lr) * factor
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "warmup": str(self.warmup), "base_lr": self.base_lr}
