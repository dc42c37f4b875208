"""The algorithm library: recipe names, configs and classes in one table."""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ValidationError

from tessera.algorithms.ema import EMA, EMAConfig
from tessera.algorithms.label_smoothing import LabelSmoothing, LabelSmoothingConfig
from tessera.algorithms.layer_freezing import LayerFreezing, LayerFreezingConfig
from tessera.algorithms.seq_length_warmup import SequenceLengthWarmup, SequenceLengthWarmupConfig
from tessera.core.algorithm import Algorithm
from tessera.errors import RecipeError

# recipe name -> (class, config model). Recipe order is the tie-break order.
REGISTRY: dict[str, tuple[type[Algorithm], type[BaseModel]]] = {
    "ema": (EMA, EMAConfig),
    "label_smoothing": (LabelSmoothing, LabelSmoothingConfig),
    "layer_freezing": (LayerFreezing, LayerFreezingConfig),
    "sequence_length_warmup": (SequenceLengthWarmup, SequenceLengthWarmupConfig),
}

__all__ = ["EMA", "LabelSmoothing", "LayerFreezing", "SequenceLengthWarmup", "REGISTRY", "build_algorithms"]


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
