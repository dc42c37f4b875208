"""The unit the trainer moves around: inputs, targets and where each example came from."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

IGNORE_INDEX = -100  # a target position with this id adds nothing to the loss


def union_provenance(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Row-wise union of two provenance matrices [B, K1], [B, K2] -> [B, K1 + K2], each class once, ``-1`` padded.

    What an example made from two others (MixUp, CutMix) belongs to: both
    sources' classes. Duplicates become ``-1`` so a mix of two examples of
    the same class is simply that class.
    """
    both = torch.cat([first, second], dim=1).sort(dim=1, descending=True).values
    repeated = torch.zeros_like(both, dtype=torch.bool)
    repeated[:, 1:] = both[:, 1:] == both[:, :-1]
    return both.masked_fill(repeated, -1).sort(dim=1, descending=True).values


@dataclass
class Batch:
    """One batch or microbatch.

    ``sample_ids`` [B] are the dataset-global example indices. ``provenance``
    [B, K] holds the class indices of each example: one column for plain
    examples; an example made from several (MixUp, CutMix) lists each of its
    classes, padded with ``-1``. Both ride along with the inputs so that
    nothing downstream ever has to guess which example a row came from: the
    governance layer routes and accounts by them, and algorithms that
    reorder or drop rows must keep them aligned (``select`` does).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    sample_ids: torch.Tensor
    provenance: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.numel())

    def to(self, device: torch.device | str) -> "Batch":
        if self.inputs.device == torch.device(device):
            return self
        return replace(
            self,
            inputs=self.inputs.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
        )

    def select(self, rows: slice | torch.Tensor) -> "Batch":
        return Batch(
            inputs=self.inputs[rows],
            targets=self.targets[rows],
            sample_ids=self.sample_ids[rows],
            provenance=self.provenance[rows],
        )

    def split_by_signature(self) -> list["Batch"]:
        """One batch per distinct set of classes (in order of first appearance); ``[self]`` if only one."""
        if bool((self.provenance == self.provenance[:1]).all()):  # a per-class microbatch: nothing to sort
            return [self]
        keys = self.provenance.sort(dim=1).values
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
        if unique.shape[0] == 1:
            return [self]
        first = [int((inverse == k).nonzero()[0]) for k in range(unique.shape[0])]
        return [
            self.select((inverse == k).nonzero().flatten()) for k in sorted(range(len(first)), key=first.__getitem__)
        ]

    def split(self, microbatch_size: int) -> list["Batch"]:
        """Consecutive microbatches of at most ``microbatch_size`` rows."""
        n = self.num_samples
        if microbatch_size >= n:
            return [self]
        return [self.select(slice(i, i + microbatch_size)) for i in range(0, n, microbatch_size)]
