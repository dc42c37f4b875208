"""The algorithm library: recipe names, configs and classes in one table.

Every method Composer 0.32 shipped is here (see docs/algorithms.md for the
cards and measurements). A recipe names them under ``algorithms:`` by the
snake_case names below.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from smalti.algorithms.augmentation import (
    AugMix,
    AugMixConfig,
    ColOut,
    ColOutConfig,
    CutMix,
    CutMixConfig,
    CutOut,
    CutOutConfig,
    MixUp,
    MixUpConfig,
    ProgressiveResizing,
    ProgressiveResizingConfig,
    RandAugment,
    RandAugmentConfig,
)
from smalti.algorithms.ema import EMA, EMAConfig
from smalti.algorithms.gradient_clipping import GradientClipping, GradientClippingConfig
from smalti.algorithms.label_smoothing import LabelSmoothing, LabelSmoothingConfig
from smalti.algorithms.layer_freezing import LayerFreezing, LayerFreezingConfig
from smalti.algorithms.sam import SAM, SAMConfig
from smalti.algorithms.selective_backprop import SelectiveBackprop, SelectiveBackpropConfig
from smalti.algorithms.seq_length_warmup import SequenceLengthWarmup, SequenceLengthWarmupConfig
from smalti.algorithms.surgery import (
    Alibi,
    BlurPool,
    ChannelsLast,
    Factorize,
    GatedLinearUnits,
    GhostBatchNorm,
    GyroDropout,
    LowPrecisionGroupNorm,
    LowPrecisionLayerNorm,
    NoOpModel,
    SqueezeExcite,
    StochasticDepth,
    WeightStandardization,
)
from smalti.algorithms.swa import SWA, SWAConfig
from smalti.core.algorithm import Algorithm
from smalti.errors import RecipeError


def _config(cls: type[Algorithm]) -> type[BaseModel]:
    return cls.config_model  # type: ignore[attr-defined]


# recipe name -> (class, config model). Recipe order is the tie-break order.
REGISTRY: dict[str, tuple[type[Algorithm], type[BaseModel]]] = {
    "alibi": (Alibi, _config(Alibi)),
    "augmix": (AugMix, AugMixConfig),
    "blurpool": (BlurPool, _config(BlurPool)),
    "channels_last": (ChannelsLast, _config(ChannelsLast)),
    "colout": (ColOut, ColOutConfig),
    "cutmix": (CutMix, CutMixConfig),
    "cutout": (CutOut, CutOutConfig),
    "ema": (EMA, EMAConfig),
    "factorize": (Factorize, _config(Factorize)),
    "gated_linear_units": (GatedLinearUnits, _config(GatedLinearUnits)),
    "ghost_batchnorm": (GhostBatchNorm, _config(GhostBatchNorm)),
    "gradient_clipping": (GradientClipping, GradientClippingConfig),
    "gyro_dropout": (GyroDropout, _config(GyroDropout)),
    "label_smoothing": (LabelSmoothing, LabelSmoothingConfig),
    "layer_freezing": (LayerFreezing, LayerFreezingConfig),
    "low_precision_groupnorm": (LowPrecisionGroupNorm, _config(LowPrecisionGroupNorm)),
    "low_precision_layernorm": (LowPrecisionLayerNorm, _config(LowPrecisionLayerNorm)),
    "mixup": (MixUp, MixUpConfig),
    "noop_model": (NoOpModel, _config(NoOpModel)),
    "progressive_resizing": (ProgressiveResizing, ProgressiveResizingConfig),
    "randaugment": (RandAugment, RandAugmentConfig),
    "sam": (SAM, SAMConfig),
    "selective_backprop": (SelectiveBackprop, SelectiveBackpropConfig),
    "sequence_length_warmup": (SequenceLengthWarmup, SequenceLengthWarmupConfig),
    "squeeze_excite": (SqueezeExcite, _config(SqueezeExcite)),
    "stochastic_depth": (StochasticDepth, _config(StochasticDepth)),
    "swa": (SWA, SWAConfig),
    "weight_standardization": (WeightStandardization, _config(WeightStandardization)),
}

__all__ = ["REGISTRY", "build_algorithms", "validate_algorithm_configs"] + sorted(
    cls.__name__ for cls, _ in REGISTRY.values()
)


def validate_algorithm_configs(configs: Mapping[str, Mapping[str, Any] | None], where: str) -> None:
    for name, options in configs.items():
        if name not in REGISTRY:
            raise RecipeError(f"{where}: unknown algorithm 'algorithms.{name}' (known: {', '.join(sorted(REGISTRY))})")
        try:
            REGISTRY[name][1].model_validate(options or {})
        except ValidationError as error:
            first = error.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                raise RecipeError(f"{where}: unknown key 'algorithms.{name}.{key}'") from None
            message = first["msg"].removeprefix("Value error, ")
            raise RecipeError(f"{where}: 'algorithms.{name}.{key}': {message}") from None


def build_algorithms(configs: Mapping[str, Mapping[str, Any] | None]) -> list[Algorithm]:
    algorithms = []
    for name, options in configs.items():
        cls, config_model = REGISTRY[name]
        algorithms.append(cls(**config_model.model_validate(options or {}).model_dump()))
    return algorithms
