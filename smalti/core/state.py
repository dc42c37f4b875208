"""What the trainer knows at any moment, and nothing it can derive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from smalti.core.time import Time, Timestamp, TimeUnit
from smalti.core.batch import Batch


@dataclass
class DataShape:
    """The fixed size of one epoch, used to convert between time units."""

    batches_per_epoch: int
    global_batch_size: int
    tokens_per_sample: int

    @property
    def samples_per_epoch(self) -> int:
        return self.batches_per_epoch * self.global_batch_size

    def batches_in(self, time: Time, max_duration: Time) -> float:
        """``time`` as a (possibly fractional) number of batches, in a run of ``max_duration``."""
        if time.unit is TimeUnit.DURATION:
            return time.value * self.batches_in(max_duration, max_duration)
        if time.unit is TimeUnit.EPOCH:
            return float(time.value * self.batches_per_epoch)
        if time.unit is TimeUnit.BATCH:
            return float(time.value)
        if time.unit is TimeUnit.SAMPLE:
            return time.value / self.global_batch_size
        return time.value / (self.global_batch_size * self.tokens_per_sample)


@dataclass
class State:
    """The live training state that algorithms and callbacks read and change.

    Kept small on purpose: configuration stays in the recipe, data in the
    loader, bookkeeping for checkpoints in the checkpoint module. ``batch``,
    ``outputs`` and ``loss`` hold the current microbatch while its events run.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    max_duration: Time
    data_shape: DataShape
    device: torch.device
    timestamp: Timestamp = field(default_factory=Timestamp)
    batch: Batch | None = None
    outputs: Any = None
    loss: torch.Tensor | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_by_class: dict[str, float] = field(default_factory=dict)  # held-out loss per class, same evaluation
    stop_training: bool = False
    # Governance, for the algorithms that work with it: what the step seam offers them (the router, through
    # which layer freezing freezes; None when nothing governs the step) and the ledger's latest entropy
    # profile (step, layer names, [classes, layers] entropies).
    governance: Any = None
    entropy_profile: tuple[int, list[str], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.max_duration.unit is TimeUnit.DURATION:
            raise ValueError("max_duration cannot be in 'dur' (it defines what 1dur means)")

    @property
    def router(self) -> Any:
        """Deprecated name of ``governance`` (kept for one release, removed in 0.3)."""
        return self.governance

    def batches_in(self, time: Time) -> float:
        """``time`` as a (possibly fractional) number of batches."""
        return self.data_shape.batches_in(time, self.max_duration)

    def fraction_of_training(self, time: Time) -> float:
        """How much of ``max_duration`` a time is (``'0.25dur'`` -> 0.25)."""
        if time.unit is TimeUnit.DURATION:
            return float(time.value)
        if time.unit is self.max_duration.unit:
            return time.value / self.max_duration.value
        return self.batches_in(time) / self.batches_in(self.max_duration)

    @property
    def elapsed_fraction(self) -> float:
        """Progress through ``max_duration``, in [0, 1]; within an epoch it counts batches."""
        unit = self.max_duration.unit
        if unit is TimeUnit.EPOCH:
            done = self.timestamp.epoch + self.timestamp.batch_in_epoch / self.data_shape.batches_per_epoch
        else:
            done = self.timestamp.get(unit)
        return min(1.0, done / self.max_duration.value)

    @property
    def is_done(self) -> bool:
        return self.stop_training or self.timestamp.get(self.max_duration.unit) >= self.max_duration.value

    def reached(self, time: Time) -> bool:
        """Whether training has got at least as far as ``time``."""
        if time.unit is TimeUnit.DURATION:
            return self.elapsed_fraction >= time.value
        return self.timestamp.get(time.unit) >= time.value

    def due_at_batch_end(self, interval: Time) -> bool:
        """Whether a batch-or-finer ``interval`` falls on the batch just finished.

        Sample, token and duration intervals are rounded to whole batches
        (tokens at the nominal sequence length), so the schedule is the same
        on every rank and after every resume.
        """
        if interval.unit is TimeUnit.EPOCH:
            return False
        every = max(1, round(self.batches_in(interval)))
        return self.timestamp.batch % every == 0

    def due_at_epoch_end(self, interval: Time) -> bool:
        return interval.unit is TimeUnit.EPOCH and self.timestamp.epoch % max(1, int(interval.value)) == 0
