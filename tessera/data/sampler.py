"""Sample order as a pure function of (seed, epoch, dataset fingerprint).

Nothing about the order depends on the number of ranks or loader workers:
the global batch ``k`` of epoch ``e`` is always the same set of examples, and
each rank takes a fixed slice of it. The sampler's whole state is
``(epoch, samples seen)``, so a run resumes mid-epoch exactly, even on a
different number of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SamplerPosition:
    epoch: int
    samples_seen: int


class DeterministicSampler:
    def __init__(
        self, num_samples: int, global_batch_size: int, seed: int, fingerprint: str, shuffle: bool = True
    ) -> None:
        if global_batch_size < 1:
            raise ValueError("global_batch_size must be at least 1")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.fingerprint = fingerprint
        self.shuffle = shuffle
        self._cached_epoch: int | None = None
        self._cached_order: torch.Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Whole global batches only: the tail of a shuffled epoch is dropped, never padded."""
        return self.num_samples // self.global_batch_size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            if self.shuffle:
                entropy = [self.seed, epoch, int(self.fingerprint[:16], 16)]
                generator = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
                order = generator.permutation(self.num_samples)
            else:
                order = np.arange(self.num_samples)
            self._cached_order = torch.from_numpy(order.astype(np.int64))
            self._cached_epoch = epoch
        assert self._cached_order is not None
        return self._cached_order

    def global_batch(self, epoch: int, batch_index: int) -> torch.Tensor:
        if not 0 <= batch_index < self.batches_per_epoch:
            raise IndexError(f"batch {batch_index} outside epoch of {self.batches_per_epoch} batches")
        start = batch_index * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def rank_slice(self, global_batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
        """Rank ``r`` of ``w`` takes the ``r``-th contiguous ``1/w`` of the global batch."""
        if self.global_batch_size % world_size:
            raise ValueError(
                f"global batch size {self.global_batch_size} is not divisible by world size {world_size}"
            )
        per_rank = self.global_batch_size // world_size
        return global_batch[rank * per_rank : (rank + 1) * per_rank]

    def position(self, epoch: int, batch_in_epoch: int) -> SamplerPosition:
        return SamplerPosition(epoch=epoch, samples_seen=batch_in_epoch * self.global_batch_size)

    def state_dict(self, position: SamplerPosition) -> dict:
        return {
            "epoch": position.epoch,
            "samples_seen": position.samples_seen,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "global_batch_size": self.global_batch_size,
        }

    def check_resumable(self, state: dict) -> SamplerPosition:
        """The position to resume from, after checking the data order is the one checkpointed."""
        for key in ("seed", "fingerprint"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler {key} {state[key]!r} differs from this run's "
                    f"{getattr(self, key)!r} (the data or seed changed)"
                )
        if state["samples_seen"] % self.global_batch_size:
            raise ValueError(
                f"cannot resume: {state['samples_seen']} samples seen is not a whole number of "
                f"global batches of {self.global_batch_size}"
            )
        return SamplerPosition(epoch=int(state["epoch"]), samples_seen=int(state["samples_seen"]))
