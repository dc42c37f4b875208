"""Recipes: the YAML files that say what to train, validated before anything runs.

Every section is a small pydantic model that forbids unknown keys, so a typo
is a one-line error naming the key and the file, not a silently ignored
setting. Relative paths in a recipe are relative to the recipe file; paths
given with ``--set`` are relative to the current directory.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tessera.algorithms import validate_algorithm_configs
from tessera.core.time import Time
from tessera.errors import RecipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _time(value: Any) -> str:
    """Validate a time string such as ``'500ba'`` and keep it as text (YAML round-trips it)."""
    return str(Time.parse(value))


class ModelConfig(Section):
    name: Literal["gpt"] = "gpt"
    n_layer: int = Field(4, ge=1)
    n_head: int = Field(4, ge=1)
    d_model: int = Field(128, ge=1)
    block_size: int = Field(64, ge=1, description="longest sequence the model accepts")
    mlp_ratio: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    alibi: bool = False


class DataConfig(Section):
    corpus: Path = Field(Path("data/shakespeare"), description="folder with manifest.csv and the texts")
    seq_len: int | None = Field(None, ge=1, description="training window; defaults to model.block_size")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    shuffle: bool = True


class OptimizerConfig(Section):
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, description="SGD only")


class SchedulerConfig(Section):
    name: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: str = "0ba"
    final_lr_fraction: float = Field(0.1, ge=0.0, le=1.0, description="lr at the end, as a fraction of lr")

    _check_warmup = field_validator("warmup", mode="before")(_time)


class TrainConfig(Section):
    max_duration: str = "1ep"
    global_batch_size: int = Field(32, ge=1, description="samples per optimizer step, summed over ranks")
    microbatch_size: int | None = Field(None, ge=1, description="samples per forward/backward on one rank")
    precision: Literal["fp32", "amp_bf16", "amp_fp16"] = "fp32"
    grad_clip_norm: float | None = Field(1.0, gt=0.0)
    compile: bool = False
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    _check_duration = field_validator("max_duration", mode="before")(_time)

    @field_validator("max_duration")
    @classmethod
    def _not_dur(cls, value: str) -> str:
        if value.endswith("dur"):
            raise ValueError("max_duration cannot be in 'dur' (it defines what 1dur means)")
        return value


class EvalConfig(Section):
    interval: str = "500ba"
    max_samples: int | None = Field(1024, ge=1, description="validation windows per evaluation (None: all)")
    batch_size: int = Field(64, ge=1)

    _check_interval = field_validator("interval", mode="before")(_time)


class CheckpointConfig(Section):
    interval: str = "500ba"
    keep: int = Field(3, ge=1, description="how many recent checkpoints to keep")
    load_path: str | None = Field(None, description="start from this checkpoint (path or fsspec URL)")
    autoresume: bool = True

    _check_interval = field_validator("interval", mode="before")(_time)


class LoggingConfig(Section):
    interval: str = "1ba"
    console: bool = True
    progress: Literal["auto", "bar", "lines", "off"] = "auto"
    jsonl: bool = True
    mlflow: bool = False

    _check_interval = field_validator("interval", mode="before")(_time)


class Recipe(Section):
    seed: int = 17
    run_dir: Path | None = None
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    algorithms: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "Recipe":
        seq_len = self.data.seq_len or self.model.block_size
        if seq_len > self.model.block_size:
            raise ValueError(f"data.seq_len ({seq_len}) exceeds model.block_size ({self.model.block_size})")
        if self.model.d_model % self.model.n_head:
            raise ValueError(f"model.d_model ({self.model.d_model}) is not divisible by model.n_head ({self.model.n_head})")
        return self

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, ignore: tuple[str, ...] = ()) -> str:
        """sha256 of the canonical JSON form, without the dotted keys in ``ignore``."""
        data = self.to_dict()
        for dotted in ignore:
            *parents, leaf = dotted.split(".")
            node = data
            for key in parents:
                node = node.get(key, {})
            node.pop(leaf, None)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


# Settings a resumed run may change without invalidating the checkpoint:
# extending or shortening training, and how it is observed.
RESUMABLE_CHANGES = (
    "run_dir",
    "train.max_duration",
    "checkpoint.keep",
    "checkpoint.load_path",
    "checkpoint.autoresume",
    "logging",
    "eval.interval",
)


def _path_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted names of every Path-typed field, so recipe-relative paths can be resolved."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += _path_fields(annotation, f"{prefix}{name}.")
        elif annotation is Path or annotation == (Path | None):
            found.append(f"{prefix}{name}")
    return found


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(data: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{where}: cannot set '{dotted}': '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``3``, ``1e-3``, ``[a, b]``, ``true``)."""
    if "=" not in text:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set train.max_duration=200ba")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {text!r}: value is not valid YAML ({error.problem})") from None
    return key, value


def _describe_error(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent_path, key = error["loc"][:-1], str(error["loc"][-1])
        parent_model: type[BaseModel] = Recipe
        for part in parent_path:
            field = parent_model.model_fields.get(str(part))
            if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
                break
            parent_model = field.annotation
        suggestion = difflib.get_close_matches(key, list(parent_model.model_fields), n=1)
        hint = f" (did you mean '{'.'.join([*map(str, parent_path), suggestion[0]])}'?)" if suggestion else ""
        return f"unknown key '{location}'{hint}"
    message = error["msg"].removeprefix("Value error, ")
    return f"'{location}': {message}" if location else message


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, resolve and validate a recipe; any problem is a ``RecipeError`` naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(error, 'problem', error)})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    for dotted in _path_fields(Recipe):
        value = _get(data, dotted)
        if isinstance(value, str) and not Path(value).is_absolute():
            _set(data, dotted, str((path.parent / value).resolve()), str(path))
    for text in overrides:
        key, value = parse_override(text)
        if key in _path_fields(Recipe) and isinstance(value, str):
            value = str(Path(value).resolve())
        _set(data, key, value, f"{path} (--set {text})")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
        raise RecipeError(f"{path}: {_describe_error(first)}{more}") from None
    validate_algorithm_configs(recipe.algorithms, where=str(path))
    return recipe
