"""Pure functional forms of every algorithm, usable without the trainer."""

from tessera.functional.ema import compute_ema, ema_smoothing
from tessera.functional.label_smoothing import smooth_labels
from tessera.functional.layer_freezing import freeze_times, freezing_units, frozen_layer_count
from tessera.functional.seq_length_warmup import set_batch_sequence_length, warmup_sequence_length

__all__ = [
    "compute_ema",
    "ema_smoothing",
    "freeze_times",
    "freezing_units",
    "frozen_layer_count",
    "set_batch_sequence_length",
    "smooth_labels",
    "warmup_sequence_length",
]
