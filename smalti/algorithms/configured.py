"""The shared base of algorithms whose settings are exactly their pydantic config."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from smalti.core.algorithm import Algorithm


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfiguredAlgorithm(Algorithm):
    """Keyword arguments validated by ``config_model`` (typos are errors) and kept as attributes."""

    config_model: type[BaseModel] = NoOptions

    def __init__(self, **options: Any) -> None:
        for key, value in self.config_model.model_validate(options).model_dump().items():
            setattr(self, key, value)
