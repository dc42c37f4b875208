"""Every parameter at a fixed place in one flat vector, so per-layer statistics are a few large operations.

On a CPU the ledger's per-step cost was almost all operator overhead: a
dot product per parameter per class adds up to hundreds of tiny calls a step.
Laying the parameters out layer by layer, with layers of equal size next to
each other (a GPT has a handful of sizes, however deep), turns "every norm
and every dot product of R rows, per layer" into one batched matrix product
per group of equal-sized layers: :meth:`FlatLayout.gram`, the per-layer Gram
matrix, which reads each row once and reads the data in place. Nothing is
padded: the layout is exact. (Separate batched norms and per-layer
matrix-vector products read the rows 3R - 2 times; on the 2-core build
machine they took 17-21 ms where the Gram matrix takes 4-6 ms, four rows of
the baby GPT's 0.8M parameters.)
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

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """[L, R, R]: per layer, the dot product of every pair of rows of ``rows`` [R, size] (float32)."""
        count_rows = rows.shape[0]
        out = torch.zeros(self.n_layers, count_rows, count_rows, device=rows.device, dtype=torch.float32)
        for start, count, numel, layers in self.groups:
            if numel == 0:
                continue
            block = rows[:, start:start + count * numel].view(count_rows, count, numel).transpose(0, 1)
            out[layers.to(rows.device)] = torch.bmm(block, block.transpose(1, 2)).float()
        return out
