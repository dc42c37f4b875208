"""SequenceLengthWarmup: start training on short sequences and lengthen them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.core.state import State
from smalti.core.time import Time
from smalti.functional.seq_length_warmup import set_batch_sequence_length, warmup_sequence_length
from smalti.core.logger import Logger


class SequenceLengthWarmupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    duration: str = "0.3dur"
    min_seq_length: int = Field(8, ge=1)
    max_seq_length: int | None = Field(None, ge=1)
    step_size: int = Field(8, ge=1)
    truncate: bool = True

    @field_validator("duration", mode="before")
    @classmethod
    def _time(cls, value: Any) -> str:
        return str(Time.parse(value))


class SequenceLengthWarmup(Algorithm):
    """Grow the training sequence length linearly over the first part of training.

    Method card
        What: on each batch, cut sequences to a length that rises linearly
        from ``min_seq_length`` to the full length over ``duration``.
        ``truncate: false`` keeps every token by reshaping each row into
        several shorter ones instead of dropping the tail.
        When it helps: causal LMs trained at long context; early steps on
        short sequences are cheaper and more stable (Li et al. report a
        stable 8x larger batch / 4x larger learning rate for GPT-2; Composer
        reports about 1.5x time-to-quality on GPT-2 125M).
        When it hurts: short contexts where attention cost is small (little
        to gain), and tasks that need long-range context early.
        Hyperparameters: ``duration`` 0.3dur, ``min_seq_length`` 8,
        ``step_size`` 8.
        Source: Li, Zhang, He, "The Stability-Efficiency Dilemma:
        Investigating Sequence Length Warmup for Training GPT Models",
        NeurIPS 2022.
        Measured in Smalti: see docs/benchmarks.md (not yet measured).

    Runs first on ``AFTER_DATALOADER`` among the batch transforms
    (``order = -100``), so later transforms see the final shape.
    """

    order = -100

    def __init__(
        self,
        duration: str = "0.3dur",
        min_seq_length: int = 8,
        max_seq_length: int | None = None,
        step_size: int = 8,
        truncate: bool = True,
    ) -> None:
        config = SequenceLengthWarmupConfig(
            duration=duration,
            min_seq_length=min_seq_length,
            max_seq_length=max_seq_length,
            step_size=step_size,
            truncate=truncate,
        )
        self.duration = Time.parse(config.duration)
        self.min_seq_length = config.min_seq_length
        self.max_seq_length = config.max_seq_length
        self.step_size = config.step_size
        self.truncate = config.truncate

    def match(self, event: Event, state: State) -> bool:
        return event is Event.AFTER_DATALOADER

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        assert state.batch is not None
        full = state.batch.inputs.shape[1]
        longest = min(self.max_seq_length or full, full)
        fraction = state.elapsed_fraction / max(state.fraction_of_training(self.duration), 1e-12)
        seq_len = warmup_sequence_length(fraction, min(self.min_seq_length, longest), longest, self.step_size)
        state.batch = set_batch_sequence_length(state.batch, seq_len, truncate=self.truncate)
        logger.log_metrics({"seq_length_warmup/seq_len": seq_len})
