"""Pure functional forms of every algorithm, usable without the trainer.

Each submodule holds one method's math (``smalti.functional.blurpool``,
``smalti.functional.mixing``, ...); the names below are the entry points.
"""

from smalti.functional.alibi import apply_alibi
from smalti.functional.augment import augmix_batch, randaugment_batch
from smalti.functional.blurpool import apply_blurpool, blur_2d
from smalti.functional.channels_last import apply_channels_last
from smalti.functional.ema import compute_ema, ema_smoothing
from smalti.functional.factorize import apply_factorization
from smalti.functional.gated_linear_units import apply_gated_linear_units
from smalti.functional.ghost_batchnorm import apply_ghost_batchnorm
from smalti.functional.gradient_clipping import adaptive_clip_, apply_gradient_clipping
from smalti.functional.gyro_dropout import apply_gyro_dropout
from smalti.functional.label_smoothing import smooth_labels
from smalti.functional.layer_freezing import freeze_times, freezing_units, frozen_layer_count, settled, unit_entropies
from smalti.functional.low_precision_norm import apply_low_precision_groupnorm, apply_low_precision_layernorm
from smalti.functional.mixing import cutmix_batch, mixup_batch
from smalti.functional.noop_model import apply_noop_model
from smalti.functional.occlusion import colout_batch, cutout_batch
from smalti.functional.progressive_resizing import resize_batch, resizing_scale
from smalti.functional.sam import sharpness_aware_perturbation
from smalti.functional.selective_backprop import select_by_loss, should_select
from smalti.functional.seq_length_warmup import set_batch_sequence_length, warmup_sequence_length
from smalti.functional.squeeze_excite import apply_squeeze_excite
from smalti.functional.stochastic_depth import apply_stochastic_depth, drop_residual
from smalti.functional.weight_averaging import update_running_average
from smalti.functional.weight_standardization import apply_weight_standardization, standardize_weight

__all__ = [
    "adaptive_clip_",
    "apply_alibi",
    "apply_blurpool",
    "apply_channels_last",
    "apply_factorization",
    "apply_gated_linear_units",
    "apply_ghost_batchnorm",
    "apply_gradient_clipping",
    "apply_gyro_dropout",
    "apply_low_precision_groupnorm",
    "apply_low_precision_layernorm",
    "apply_noop_model",
    "apply_squeeze_excite",
    "apply_stochastic_depth",
    "apply_weight_standardization",
    "augmix_batch",
    "blur_2d",
    "colout_batch",
    "compute_ema",
    "cutmix_batch",
    "cutout_batch",
    "drop_residual",
    "ema_smoothing",
    "freeze_times",
    "freezing_units",
    "frozen_layer_count",
    "mixup_batch",
    "randaugment_batch",
    "resize_batch",
    "resizing_scale",
    "select_by_loss",
    "set_batch_sequence_length",
    "settled",
    "sharpness_aware_perturbation",
    "should_select",
    "smooth_labels",
    "standardize_weight",
    "unit_entropies",
    "update_running_average",
    "warmup_sequence_length",
]
