"""Progressive bottom-up layer freezing (Composer's schedule) as pure functions."""

from __future__ import annotations

import math

import torch
from torch import nn


def frozen_layer_count(progress: float, num_layers: int, freeze_start: float, freeze_level: float) -> int:
    """How many of the bottom layers are frozen at ``progress`` (a fraction of training).

    None before ``freeze_start``; then the frozen fraction grows linearly to
    ``freeze_level`` at the end of training.
    """
    if not 0.0 <= freeze_start < 1.0 or not 0.0 <= freeze_level <= 1.0:
        raise ValueError("need 0 <= freeze_start < 1 and 0 <= freeze_level <= 1")
    if progress < freeze_start:
        return 0
    fraction = freeze_level * min(1.0, (progress - freeze_start) / (1.0 - freeze_start))
    return min(num_layers, math.floor(fraction * num_layers + 1e-9))


def freeze_times(num_layers: int, freeze_start: float, freeze_level: float) -> list[float | None]:
    """For each layer (bottom first), the fraction of training from which it is frozen (None: never)."""
    times: list[float | None] = []
    for i in range(num_layers):
        needed = (i + 1) / num_layers  # frozen fraction at which layer i freezes
        if needed > freeze_level + 1e-12:
            times.append(None)
        else:
            times.append(freeze_start + (1.0 - freeze_start) * needed / freeze_level)
    return times


def freezing_units(model: nn.Module) -> list[str]:
    """The model's layers, bottom-up: its top-level children, with module lists expanded into their items.

    Units without parameters of their own (a head tied to the embedding, say) are left out.
    """
    owners = {name.split(".")[0] for name, _ in model.named_parameters()}
    units: list[str] = []
    for name, child in model.named_children():
        if name not in owners:
            continue
        if isinstance(child, (nn.ModuleList, nn.Sequential)):
            units += [f"{name}.{i}" for i, _ in enumerate(child)]
        else:
            units.append(name)
    return units


def unit_entropies(units: list[str], layer_names: list[str], entropies: torch.Tensor) -> dict[str, float]:
    """Mean entropy (over classes and over the unit's own layers) of each unit that has measured layers."""
    per_layer = entropies.double().mean(0).cpu()
    found = {}
    for unit in units:
        columns = [j for j, name in enumerate(layer_names) if name == unit or name.startswith(unit + ".")]
        if columns:
            found[unit] = float(per_layer[columns].mean())
    return found


def settled(previous: float, current: float, tolerance: float) -> bool:
    """Whether an entropy moved by at most ``tolerance`` of its size between two profiles."""
    return abs(current - previous) <= tolerance * max(abs(previous), 1e-12)
