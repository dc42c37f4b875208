"""SAM: sharpness-aware minimization, as a second gradient pass before the optimizer step."""

from __future__ import annotations

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.functional.sam import sharpness_aware_perturbation
from smalti.core.logger import Logger


class SAMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rho: float = Field(0.05, gt=0.0, description="radius of the neighbourhood searched")
    epsilon: float = Field(1e-12, gt=0.0)
    interval: int = Field(1, ge=1, description="take a SAM step every N optimizer steps (plain steps between)")


class SAM(Algorithm):
    """Minimize the loss at the worst nearby point: step with the gradient at ``w + rho g/||g||``.

    Method card
        What: on ``BEFORE_OPTIMIZER_STEP`` (every ``interval`` steps) the parameters move by
        ``rho * g / ||g||``, the batch's gradient is recomputed there, and the parameters move back;
        the optimizer then steps with that gradient.
        When it helps: generalisation of over-parameterised vision models (the paper: -0.5-1.5%
        error). When it hurts: it doubles the cost of each SAM step (use ``interval`` > 1);
        gains are small on short runs.
        Hyperparameters: ``rho`` 0.05, ``interval`` 1 (Composer: 10 for speed).
        Source: Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
        Generalization", ICLR 2021.
        Governance: the second gradient is computed outside the routed backward, so SAM cannot
        run with routing or the ledger on (the trainer refuses the recipe).
        Measured in Smalti: see docs/algorithms.md.
    """

    changes = frozenset({"gradients"})
    routing_safe = False
    needs_unscaled_gradients = True

    def __init__(self, rho: float = 0.05, epsilon: float = 1e-12, interval: int = 1) -> None:
        config = SAMConfig(rho=rho, epsilon=epsilon, interval=interval)
        self.rho, self.epsilon, self.interval = config.rho, config.epsilon, config.interval

    def match(self, event: Event, state: State) -> bool:
        return event is Event.BEFORE_OPTIMIZER_STEP and state.timestamp.batch % self.interval == 0

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        model, batch = state.model, state.batch
        assert batch is not None
        parameters = [p for p in model.parameters() if p.requires_grad]
        steps = sharpness_aware_perturbation(parameters, self.rho, self.epsilon)
        for p in parameters:
            p.grad = None
        outputs = model(batch.inputs)
        # Module.__getattr__ types the model's loss methods as Tensor | Module
        loss = model.loss(outputs, batch.targets) / model.loss_units(batch.targets).clamp(min=1)  # type: ignore[operator]
        loss.backward()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for p in parameters:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        with torch.no_grad():
            for p, step in zip(parameters, steps):
                p.sub_(step)
