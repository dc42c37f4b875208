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
    def __init__(self, numels: Sequence[int], layer_of: np.ndarray, n_layers: int, chunk: int = 1 << 16) -> None:
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
        self._order_on: dict[torch.device, torch.Tensor] = {}
        self._chunks = [chunk_length(numel, chunk) for _, _, numel, _ in self.groups]

    def views(self, flat: torch.Tensor, shapes: Sequence[torch.Size]) -> list[torch.Tensor]:
        """One view per parameter into ``flat`` (a vector of ``size``), shaped like the parameter."""
        return [flat[o : o + n].view(shape) for o, n, shape in zip(self.offsets.tolist(), self.numels, shapes)]

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """[L, R, R]: per layer, the dot product of every pair of rows of ``rows`` [R, size] (float32).

        One batched product per group, then one gather into layer order with an
        index kept on the rows' device (moving it there each call would make a
        GPU wait for all queued work, once per group). A large layer is cut
        into chunks of equal length and their Grams summed: a product of a few
        rows over millions of elements is otherwise one long reduction per
        layer, which cuBLAS runs on a handful of the GPU's multiprocessors
        (measured on an H100: 46 ms a step for a 12-layer, 768-wide GPT, where
        the chunked product reads the same bytes at memory speed).
        """
        count_rows = rows.shape[0]
        blocks = []
        for (start, count, numel, _), chunk in zip(self.groups, self._chunks):
            if numel == 0:
                blocks.append(rows.new_zeros(count, count_rows, count_rows))
                continue
            pieces = numel // chunk  # chunk divides numel: the view below needs no copy
            block = rows[:, start : start + count * numel].view(count_rows, count * pieces, chunk).transpose(0, 1)
            gram = torch.bmm(block, block.transpose(1, 2))
            blocks.append(gram.view(count, pieces, count_rows, count_rows).sum(1) if pieces > 1 else gram)
        return torch.cat(blocks).float().index_select(0, self.layer_order(rows.device))

    def layer_order(self, device: torch.device) -> torch.Tensor:
        """Position of each layer in the groups' order, on ``device`` (cached: call it once before training,
        so that not even the first step waits for the copy)."""
        if device not in self._order_on:
            position = torch.empty(self.n_layers, dtype=torch.long)
            position[torch.cat([layers for _, _, _, layers in self.groups])] = torch.arange(self.n_layers)
            self._order_on[device] = position.to(device)
        return self._order_on[device]


def chunk_length(numel: int, longest: int = 1 << 16) -> int:
    """The longest divisor of ``numel`` of at most ``longest`` elements, if one of at least ``longest // 32``
    exists; otherwise ``numel`` itself (one piece: a layer without such a divisor is summed whole)."""
    if numel <= longest:
        return max(numel, 1)
    best = 0
    for small in range(1, int(numel**0.5) + 1):
        if numel % small == 0:
            for divisor in (small, numel // small):
                if divisor <= longest:
                    best = max(best, divisor)
    return best if best >= max(2, longest // 32) else numel
