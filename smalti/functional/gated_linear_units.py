"""Gated linear units in the transformer MLP (Shazeer, "GLU Variants Improve Transformer", 2020)."""

from __future__ import annotations

import torch
from torch import nn

from smalti.models.gpt import MLP


class GatedMLP(nn.Module):
    """``proj(act(gate(x)) * up(x))``: the MLP with a learned, input-dependent gate.

    The hidden width defaults to 2/3 of the MLP's, so the parameter count
    (three matrices instead of two) stays the same. ``proj`` and ``drop``
    keep their names, so policies written for ``blocks.*.mlp.proj`` still match.
    """

    def __init__(self, mlp: MLP, hidden: int | None = None, activation: str = "gelu") -> None:
        super().__init__()
        d_model, width = mlp.fc.in_features, mlp.fc.out_features
        hidden = hidden or max(1, (2 * width) // 3)
        bias = mlp.fc.bias is not None
        self.gate = nn.Linear(d_model, hidden, bias=bias)
        self.up = nn.Linear(d_model, hidden, bias=bias)
        self.act = {"gelu": nn.GELU(), "relu": nn.ReLU(), "silu": nn.SiLU()}[activation]
        self.proj = nn.Linear(hidden, d_model, bias=mlp.proj.bias is not None)
        self.drop = mlp.drop
        std = float(mlp.fc.weight.detach().std()) if mlp.fc.weight.numel() > 1 else 0.02
        for linear in (self.gate, self.up):
            nn.init.normal_(linear.weight, std=std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.proj.weight, std=float(mlp.proj.weight.detach().std()))
        if self.proj.bias is not None:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.gate(x)) * self.up(x)))


def apply_gated_linear_units(model: nn.Module, activation: str = "gelu", hidden: int | None = None) -> int:
    if activation not in ("gelu", "relu", "silu"):
        raise ValueError(f"activation must be gelu, relu or silu, got {activation!r}")
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MLP):
                setattr(parent, name, GatedMLP(child, hidden, activation))
                count += 1
    return count
