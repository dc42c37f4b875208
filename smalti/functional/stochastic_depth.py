"""Stochastic depth (Huang et al., ECCV 2016) as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from smalti.models.gpt import Block
from smalti.models.resnet import BasicBlock


def drop_residual(residual: torch.Tensor, drop_rate: float, mode: str, training: bool) -> torch.Tensor:
    """Drop a residual branch with probability ``drop_rate``.

    ``sample``: per example, survivors scaled by 1/(1-p) (expectation kept;
    evaluation uses the branch as is). ``block``: the whole batch at once,
    unscaled while training, scaled by (1-p) in evaluation (the original paper).
    """
    if drop_rate == 0.0:
        return residual
    if mode == "sample":
        if not training:
            return residual
        keep = torch.empty(residual.shape[0], *([1] * (residual.dim() - 1)), device=residual.device)
        keep = keep.bernoulli_(1.0 - drop_rate).to(residual.dtype)
        return residual * keep / (1.0 - drop_rate)
    if mode == "block":
        if not training:
            return residual * (1.0 - drop_rate)
        survive = torch.rand((), device=residual.device) >= drop_rate
        return residual * survive.to(residual.dtype)
    raise ValueError(f"stochastic depth mode must be 'sample' or 'block', got {mode!r}")


class StochasticBlock(nn.Module):
    """A residual block (ResNet ``BasicBlock`` or GPT ``Block``) whose residual branches may be dropped."""

    def __init__(self, block: nn.Module, drop_rate: float, mode: str) -> None:
        super().__init__()
        if not isinstance(block, (BasicBlock, Block)):
            raise TypeError(f"stochastic depth does not know the residual structure of {type(block).__name__}")
        self.block, self.drop_rate, self.mode = block, drop_rate, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block, drop = self.block, lambda r: drop_residual(r, self.drop_rate, self.mode, self.training)
        if isinstance(block, BasicBlock):
            return F.relu(block.shortcut(x) + drop(block.residual(x)))
        x = x + drop(block.attn(block.ln_1(x)))
        return x + drop(block.mlp(block.ln_2(x)))


def apply_stochastic_depth(
    model: nn.Module, drop_rate: float = 0.2, drop_distribution: str = "linear", mode: str = "sample"
) -> int:
    """Wrap every residual block; with ``linear`` the rate grows with depth up to ``drop_rate`` at the last block."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if drop_distribution not in ("linear", "uniform"):
        raise ValueError(f"drop_distribution must be 'linear' or 'uniform', got {drop_distribution!r}")
    places = [
        (parent, name)
        for parent in model.modules()
        if not isinstance(parent, StochasticBlock)
        for name, child in parent.named_children()
        if isinstance(child, (BasicBlock, Block))
    ]
    for index, (parent, name) in enumerate(places):
        rate = drop_rate * (index + 1) / len(places) if drop_distribution == "linear" else drop_rate
        setattr(parent, name, StochasticBlock(getattr(parent, name), rate, mode))
    return len(places)
