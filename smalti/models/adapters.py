"""Per-class adapters: parameters that exclusive routing rules can confine a class to.

``add_class_adapters(model, targets, classes, ...)`` is the one place the
transform happens. For each target module (for the GPT, every block's MLP) it
registers ``<target>.adapters.<class key>``: a small MLP branch (width ->
hidden -> width) whose output is added to the target's output. The branch's
last layer starts at zero, so the model's output is unchanged until the
adapter learns.

Each adapter is **gated per example by provenance**: it contributes only to
rows whose classes fall under its class (``set_row_classes`` before each
forward; the trainer does this). Other classes' forward passes never see it,
so, with an exclusive rule confining the class to its adapter, the rest of
the model never depends on that class's content and resetting the adapter
removes it. For generation without a class, no adapter is on unless asked
(``smalti sample --adapter CLASS``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from smalti.trust.policy import adapter_key
from smalti.trust.taxonomy import Taxonomy


class Adapter(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)
        nn.init.zeros_(self.proj.weight)  # output unchanged at initialisation
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class AdapterGates:
    """Which rows each adapter applies to, for the forward pass about to run."""

    def __init__(self, class_names: Sequence[str], adapter_classes: Sequence[str], gated: bool = True) -> None:
        self.adapter_classes = list(adapter_classes)
        self.gated = gated
        # covers[k, c]: class index c falls under adapter k's class
        self.covers = torch.tensor(
            [[Taxonomy.covers(a, c) for c in class_names] for a in adapter_classes], dtype=torch.bool
        )
        self.rows: torch.Tensor | None = None  # [adapters, batch] float gates, or None: all off

    def set_provenance(self, provenance: torch.Tensor | None) -> None:
        if provenance is None:
            self.rows = None
            return
        valid = provenance >= 0
        hits = self.covers[:, provenance.clamp(min=0)] & valid  # [adapters, batch, K]
        self.rows = hits.any(dim=-1).float()

    def set_on(self, adapter_classes: Sequence[str], batch_size: int) -> None:
        """Turn chosen adapters on for every row (generation); ungated adapters are always on."""
        self.rows = torch.tensor([[1.0 if a in adapter_classes else 0.0] * batch_size for a in self.adapter_classes])


class AdapterBank(nn.Module):
    def __init__(self, width: int, hidden: int, adapter_classes: Sequence[str], gates: AdapterGates) -> None:
        super().__init__()
        for c in adapter_classes:  # registered by key, so parameters are <target>.adapters.<key>.*
            self.add_module(adapter_key(c), Adapter(width, hidden))
        self._gates = [gates]  # a list, so the shared gates are not registered as a submodule

    def forward(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        gates = self._gates[0]
        if not gates.gated:  # a shared slice: in every row's forward pass, whatever its class (or none)
            for branch in self.children():
                output = output + branch(x)
            return output
        rows = gates.rows
        if rows is None:
            return output
        rows = rows.to(device=x.device, dtype=output.dtype)
        for k, branch in enumerate(self.children()):
            gate = rows[k].view(-1, *([1] * (output.dim() - 1)))
            output = output + gate * branch(x)
        return output


def add_class_adapters(
    model: nn.Module,
    targets: Sequence[str],
    adapter_classes: Sequence[str],
    class_names: Sequence[str],
    width: int,
    hidden: int,
    gated: bool = True,
) -> AdapterGates:
    """Attach an adapter bank to each target module; returns the gates the trainer sets per batch."""
    keys = [adapter_key(c) for c in adapter_classes]
    if len(set(keys)) != len(keys):
        raise ValueError("two adapter classes map to the same module name")
    gates = AdapterGates(class_names, adapter_classes, gated)
    modules = dict(model.named_modules())
    for name in targets:
        target = modules[name]
        target.adapters = AdapterBank(width, hidden, adapter_classes, gates)
        target.register_forward_hook(lambda module, args, output: module.adapters(args[0], output))
    # nn.Module's __setattr__ is typed for tensors and modules only
    model.adapter_gates = gates  # type: ignore[assignment]
    return gates


def set_row_classes(model: nn.Module, provenance: torch.Tensor | None) -> None:
    """Gate the model's adapters (if it has any) for the rows about to be run."""
    gates = getattr(model, "adapter_gates", None)
    if gates is not None:
        gates.set_provenance(provenance)
