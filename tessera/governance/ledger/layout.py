"""Every parameter at a fixed place in one flat vector, so per-layer statistics are a few large operations.

On a CPU the ledger's per-step cost was almost all operator overhead: a
dot product per parameter per class adds up to hundreds of tiny calls a step.
Laying the parameters out layer by layer, with layers of equal size next to
each other, turns "the norm of each layer" into one batched reduction per
group of equal-sized layers (a GPT has a handful of groups, however deep) and
"the dot product of each layer" into one matrix-vector product per layer,
reading the data in place. Nothing is padded: the layout is exact.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch


class FlatLayout:
    def __init__(self, numels: Sequence[int], layer_of: np.ndarray, n_layers: int) -> None:
        members: list[list[int]] = [[] for _ in range(n_layers)]
        for i, layer in enumerate(layer_of):
            if layer >= 0:
                members[int(layer)].append(i)
        layer_numel = [sum(numels[i] for i in m) for m in members]
        by_size: dict[int, list[int]] = defaultdict(list)
        for layer in range(n_layers):
            by_size[layer_numel[layer]].append(layer)
        self.offsets = np.zeros(len(numels), dtype=np.int64)
        self.layer_spans: list[tuple[int, int]] = [(0, 0)] * n_layers
        # (start, layers in the group, numel of each, their layer indices)
        self.groups: list[tuple[int, int, int, torch.Tensor]] = []
        position = 0
        for size in sorted(by_size):
            layers = by_size[size]
            self.groups.append((position, len(layers), size, torch.tensor(layers)))
            for layer in layers:
                self.layer_spans[layer] = (position, position + size)
                for i in members[layer]:
                    self.offsets[i] = position
                    position += numels[i]
        self.numels = list(numels)
        self.size = position
        self.n_layers = n_layers

    def views(self, flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """One view per parameter into ``flat`` (a vector of ``size``), shaped like the parameter."""
        return [flat[o:o + n].view(shape) for o, n, shape in zip(self.offsets.tolist(), self.numels, shapes)]

    def norms_sq(self, rows: torch.Tensor) -> torch.Tensor:
        """[R, L]: the squared norm of every layer's slice of every row of ``rows`` [R, size]."""
        out = torch.zeros(rows.shape[0], self.n_layers, device=rows.device, dtype=torch.float32)
        for start, count, numel, layers in self.groups:
            if numel == 0:
                continue
            block = rows[:, start:start + count * numel].view(rows.shape[0], count, numel)
            out[:, layers.to(rows.device)] = torch.linalg.vector_norm(block, dim=2).float() ** 2
        return out

    def dots(self, rows: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
        """[R, L]: every layer's dot product between each row of ``rows`` [R, size] and ``vector`` [size]."""
        columns = [rows[:, a:b] @ vector[a:b] if b > a else rows.new_zeros(rows.shape[0])
                   for a, b in self.layer_spans]
        return torch.stack(columns, dim=1).float()
