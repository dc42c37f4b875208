"""Optimizers and learning-rate schedules in Time units."""

from __future__ import annotations

import math
from typing import Any

import torch

from smalti.config import OptimizerConfig, SchedulerConfig
from smalti.core.state import State
from smalti.core.time import Time


def build_optimizer(model: torch.nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices and embeddings only; biases and norm gains are not decayed.

    Parameters are grouped by name in ``named_parameters`` order, so the
    optimizer state layout is identical on every rank and after a resume.
    """
    decay, no_decay = _groups(model)
    parameters = dict(model.named_parameters())
    groups = [
        {"params": [parameters[n] for n in decay], "weight_decay": config.weight_decay},
        {"params": [parameters[n] for n in no_decay], "weight_decay": 0.0},
    ]
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
    return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)


def _groups(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    decay: list[str] = []
    no_decay: list[str] = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(name)
    return decay, no_decay


def optimizer_parameter_names(model: torch.nn.Module) -> list[str]:
    """The parameter name behind each index of ``build_optimizer``'s state dict (decayed group first).

    Whoever edits a saved optimizer state (deletion resets a class's Adam moments) must map indices
    through this, not through the model's state dict order.
    """
    decay, no_decay = _groups(model)
    return decay + no_decay


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
        lr = self.base_lr * self.factor(state)
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "warmup": str(self.warmup), "base_lr": self.base_lr}
