"""Sample order as a pure function of (seed, epoch, dataset fingerprint).

Nothing about the order depends on the number of ranks or loader workers:
global batch ``k`` of epoch ``e`` is always the same list of examples, and
rank ``r`` of ``w`` takes its ``r``-th contiguous ``1/w`` of it. The
sampler's whole state is ``(epoch, samples seen)``, so a run resumes
mid-epoch exactly, even on a different number of ranks.

Batching modes (``data.batching``):

- ``random``: a permutation of all examples, or with ``shuffle_block_shards``
  a shuffle of shards in blocks and of examples inside each block (for
  streaming datasets larger than the cache);
- ``stratified``: every global batch holds each class in proportion to its
  share of the dataset, to within one example (each prefix of the epoch too);
- ``per_class``: the epoch is cut into single-class units of ``unit``
  examples; a global batch is a sequence of units, so every microbatch whose
  size divides ``unit`` comes from exactly one class.

Several datasets mix with fixed weights (``MixtureOrder``), each batch
holding each dataset's share to within one example.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch


def _rng(seed: int, epoch: int, fingerprint: str, *extra: int) -> np.random.Generator:
    fp = int(hashlib.sha256(fingerprint.encode()).hexdigest()[:16], 16)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, fp, *extra])))


class SampleOrder(Protocol):
    """One epoch's global order: ``batches_per_epoch * global_batch_size`` example indices."""

    def batches_per_epoch(self, global_batch_size: int) -> int: ...

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray: ...


@dataclass(frozen=True)
class RandomOrder:
    num_samples: int
    shuffle: bool = True
    shard_sizes: tuple[int, ...] | None = None
    block_shards: int | None = None

    def batches_per_epoch(self, global_batch_size: int) -> int:
        return self.num_samples // global_batch_size

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        rng = _rng(seed, epoch, fingerprint)
        if self.block_shards is None or self.shard_sizes is None:
            return rng.permutation(self.num_samples)
        starts = np.concatenate([[0], np.cumsum(self.shard_sizes)])
        shards = rng.permutation(len(self.shard_sizes))
        pieces = []
        for b in range(0, len(shards), self.block_shards):
            block = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in shards[b : b + self.block_shards]])
            pieces.append(rng.permutation(block))
        return np.concatenate(pieces)

    def full_order(self, epoch: int, seed: int, fingerprint: str) -> np.ndarray:
        return self.epoch_order(epoch, seed, fingerprint, 1)


@dataclass(frozen=True)
class StratifiedOrder:
    classes: np.ndarray  # class index of every example

    def batches_per_epoch(self, global_batch_size: int) -> int:
        return len(self.classes) // global_batch_size

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray:
        rng = _rng(seed, epoch, fingerprint)
        labels, counts = np.unique(self.classes, return_counts=True)
        slots = _interleave(counts)
        members = [rng.permutation(np.flatnonzero(self.classes == label)) for label in labels]
        order = np.empty(len(self.classes), dtype=np.int64)
        for c, indices in enumerate(members):
            order[slots == c] = indices
        usable = self.batches_per_epoch(global_batch_size) * global_batch_size
        batches = order[:usable].reshape(-1, global_batch_size)
        return rng.permuted(batches, axis=1).reshape(-1)  # mix classes inside each batch


@dataclass(frozen=True)
class PerClassOrder:
    classes: np.ndarray
    unit: int

    def _units(self, rng: np.random.Generator) -> np.ndarray:
        units = []
        for label in np.unique(self.classes):
            members = rng.permutation(np.flatnonzero(self.classes == label))
            whole = len(members) // self.unit * self.unit
            units.append(members[:whole].reshape(-1, self.unit))
        stacked = np.concatenate(units) if units else np.zeros((0, self.unit), dtype=np.int64)
        return stacked[rng.permutation(len(stacked))]

    def batches_per_epoch(self, global_batch_size: int) -> int:
        if global_batch_size % self.unit:
            raise ValueError(f"global batch {global_batch_size} is not a whole number of class units of {self.unit}")
        whole_units = sum(int(n) // self.unit for n in np.unique(self.classes, return_counts=True)[1])
        return whole_units // (global_batch_size // self.unit)

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray:
        units = self._units(_rng(seed, epoch, fingerprint))
        usable = self.batches_per_epoch(global_batch_size) * (global_batch_size // self.unit)
        return units[:usable].reshape(-1)

    def full_order(self, epoch: int, seed: int, fingerprint: str) -> np.ndarray:
        """Every whole unit of the epoch, before cutting to whole batches."""
        return self._units(_rng(seed, epoch, fingerprint)).reshape(-1)

    def countable(self, keep: np.ndarray) -> int:
        """Examples in whole units of the classes ``keep`` [C bool] marks."""
        labels, counts = np.unique(self.classes, return_counts=True)
        return int(sum(n // self.unit * self.unit for label, n in zip(labels, counts) if keep[label]))


@dataclass(frozen=True)
class FilteredOrder:
    """Another order with some classes left out, and some placed last, in every epoch.

    Leaving a class out *filters* the full order: every other example keeps
    its place relative to the rest, so up to a class's first appearance the
    filtered stream and the original are the same batches. That is what lets
    a deletion restart from a checkpoint taken before the class appeared and
    replay to the exact weights of a run that never had it (G5).

    Placing classes last (a deletion-aware order) puts that checkpoint late
    in the epoch, so forgetting them replays only the tail.

    ``chosen`` keeps only some examples (a relearning attack's k), filtered
    the same way.
    """

    inner: RandomOrder | PerClassOrder
    classes: np.ndarray  # class index of every example
    excluded: frozenset[int]
    late: frozenset[int] = frozenset()
    chosen: np.ndarray | None = None  # [examples] bool, or None: every example of a kept class

    def _masks(self) -> tuple[np.ndarray, np.ndarray]:
        n = max(int(self.classes.max()) + 1 if len(self.classes) else 0, max(self.excluded | self.late, default=-1) + 1)
        keep = np.ones(n, dtype=bool)
        keep[sorted(self.excluded)] = False
        late = np.zeros(n, dtype=bool)
        late[sorted(self.late)] = True
        return keep, late

    def _count(self, keep: np.ndarray) -> int:
        if isinstance(self.inner, PerClassOrder):
            return self.inner.countable(keep)
        return int(self._trained(keep).sum())

    def _trained(self, keep: np.ndarray, examples: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Which of ``examples`` (default: all) train: of a kept class, and chosen if only some are."""
        mask = keep[self.classes[examples]]
        return mask if self.chosen is None else mask & self.chosen[examples]

    def batches_per_epoch(self, global_batch_size: int) -> int:
        if isinstance(self.inner, PerClassOrder):
            self.inner.batches_per_epoch(global_batch_size)  # checks the batch is whole units
        return self._count(self._masks()[0]) // global_batch_size

    def first_late_batch(self, global_batch_size: int) -> int | None:
        """Index (in each epoch) of the first batch that may hold a late class; None without late classes."""
        if not self.late:
            return None
        keep, late = self._masks()
        return self._count(keep & ~late) // global_batch_size

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray:
        order = self.inner.full_order(epoch, seed, fingerprint)
        keep, late = self._masks()
        order = order[self._trained(keep, order)]
        if self.late:
            is_late = late[self.classes[order]]
            order = np.concatenate([order[~is_late], order[is_late]])
        return order[: self.batches_per_epoch(global_batch_size) * global_batch_size]


def _interleave(counts: np.ndarray) -> np.ndarray:
    """Owner of each slot when item m of owner c sits at virtual time (m + 0.5) / n_c.

    Merging by time keeps every prefix within one item of each owner's exact
    share (Webster's method), so proportions hold batch by batch.
    """
    times = np.concatenate([(np.arange(n) + 0.5) / n for n in counts])
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner[np.lexsort((owner, times))]


@dataclass(frozen=True)
class MixtureOrder:
    """Several datasets, concatenated in one index space, drawn in fixed proportions.

    Each dataset is an endless stream of its own permutations (a small
    dataset repeats, a large one is sampled), so the proportions hold in
    every batch however the sizes compare. An epoch is as many batches as all
    datasets together hold examples.
    """

    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    def batches_per_epoch(self, global_batch_size: int) -> int:
        return sum(self.sizes) // global_batch_size

    def _slots_per_epoch(self, total: int) -> np.ndarray:
        share = np.asarray(self.weights, dtype=np.float64) / sum(self.weights) * total
        slots = np.floor(share).astype(np.int64)
        slots[np.argsort(-(share - slots), kind="stable")[: total - slots.sum()]] += 1
        return slots

    def epoch_order(self, epoch: int, seed: int, fingerprint: str, global_batch_size: int) -> np.ndarray:
        total = self.batches_per_epoch(global_batch_size) * global_batch_size
        slots = self._slots_per_epoch(total)
        owners = _interleave(slots)
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        order = np.empty(total, dtype=np.int64)
        for d, (size, count) in enumerate(zip(self.sizes, slots)):
            positions = epoch * count + np.arange(count)  # where this epoch continues dataset d's stream
            picked = np.empty(count, dtype=np.int64)
            for round_ in np.unique(positions // size):
                here = positions // size == round_
                permutation = _rng(seed, int(round_), fingerprint, d).permutation(size)
                picked[here] = permutation[positions[here] % size]
            order[owners == d] = picked + offsets[d]
        batches = order.reshape(-1, global_batch_size)
        return _rng(seed, epoch, fingerprint, len(self.sizes)).permuted(batches, axis=1).reshape(-1)


@dataclass(frozen=True)
class SamplerPosition:
    epoch: int
    samples_seen: int


class DeterministicSampler:
    def __init__(
        self, order: SampleOrder, global_batch_size: int, seed: int, fingerprint: str, num_samples: int
    ) -> None:
        if global_batch_size < 1:
            raise ValueError("global_batch_size must be at least 1")
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}"
            )
        self.order = order
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.fingerprint = fingerprint
        self.batches_per_epoch = order.batches_per_epoch(global_batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"not one whole global batch of {global_batch_size} per epoch with this batching")
        self._cached_epoch: int | None = None
        self._cached_order: torch.Tensor | None = None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached_epoch != epoch:
            order = self.order.epoch_order(epoch, self.seed, self.fingerprint, self.global_batch_size)
            self._cached_order = torch.from_numpy(np.asarray(order, dtype=np.int64))
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
            raise ValueError(f"global batch size {self.global_batch_size} is not divisible by world size {world_size}")
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
        for key in ("seed", "fingerprint", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler {key} {state[key]!r} differs from this run's "
                    f"{getattr(self, key)!r} (the data, seed or batch size changed)"
                )
        return SamplerPosition(epoch=int(state["epoch"]), samples_seen=int(state["samples_seen"]))


def make_order(
    mode: str,
    classes: torch.Tensor,
    shuffle: bool = True,
    unit: int | None = None,
    shard_sizes: Sequence[int] | None = None,
    block_shards: int | None = None,
) -> SampleOrder:
    labels = classes.numpy() if isinstance(classes, torch.Tensor) else np.asarray(classes)
    if mode == "random":
        return RandomOrder(len(labels), shuffle, tuple(shard_sizes) if shard_sizes else None, block_shards)
    if mode == "stratified":
        return StratifiedOrder(labels)
    if mode == "per_class":
        if unit is None or unit < 1:
            raise ValueError("per_class batching needs a unit (the microbatch size) of at least 1")
        return PerClassOrder(labels, unit)
    raise ValueError(f"unknown batching mode {mode!r} (random, stratified, per_class)")
