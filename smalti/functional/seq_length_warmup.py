"""Sequence-length warmup as pure functions."""

from __future__ import annotations

from dataclasses import replace

from smalti.core.batch import Batch


def warmup_sequence_length(fraction_done: float, min_seq_length: int, max_seq_length: int, step_size: int = 8) -> int:
    """Linear from ``min`` to ``max`` as ``fraction_done`` (of the warmup) goes 0 -> 1.

    Rounded down to a multiple of ``step_size`` (hardware-friendly shapes,
    few distinct compiled graphs), never below ``min_seq_length``.
    """
    if not 1 <= min_seq_length <= max_seq_length:
        raise ValueError(f"need 1 <= min_seq_length ({min_seq_length}) <= max_seq_length ({max_seq_length})")
    if fraction_done >= 1.0:
        return max_seq_length
    length = min_seq_length + (max_seq_length - min_seq_length) * max(0.0, fraction_done)
    length = int(length) // step_size * step_size
    return max(min_seq_length, min(max_seq_length, length))


def set_batch_sequence_length(batch: Batch, seq_len: int, truncate: bool = True) -> Batch:
    """Shorten every sequence of ``batch`` to ``seq_len`` tokens.

    ``truncate=True`` keeps the first ``seq_len`` tokens of each row and
    drops the rest. ``truncate=False`` keeps the tokens instead: each row is
    cut into ``length // seq_len`` rows of ``seq_len`` (the remainder is
    dropped), each new row inheriting its example's id and class.
    """
    length = batch.inputs.shape[1]
    if seq_len >= length:
        return batch
    if truncate:
        return replace(batch, inputs=batch.inputs[:, :seq_len], targets=batch.targets[:, :seq_len])
    pieces = length // seq_len
    usable = pieces * seq_len
    return Batch(
        inputs=batch.inputs[:, :usable].reshape(-1, seq_len),
        targets=batch.targets[:, :usable].reshape(-1, seq_len),
        sample_ids=batch.sample_ids.repeat_interleave(pieces, dim=0),
        provenance=batch.provenance.repeat_interleave(pieces, dim=0),
    )
