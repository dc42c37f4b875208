"""Pure functional forms of every algorithm, usable without the trainer."""

from tessera.functional.ema import compute_ema, ema_smoothing
from tessera.functional.label_smoothing import smooth_labels
from tessera.functional.seq_length_warmup import set_batch_sequence_length, warmup_sequence_length

__all__ = [
    "compute_ema",
    "ema_smoothing",
    "set_batch_sequence_length",
    "smooth_labels",
    "warmup_sequence_length",
]
