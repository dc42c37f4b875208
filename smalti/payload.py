"""The checkpoint payload, typed: what a checkpoint holds besides its tensors, and the one reader that checks it.

A checkpoint is a file anyone may hand us (``checkpoint.load_path``, ``init.from_run``, a run folder written by
someone else), so every field is checked for its type before the loop, a deletion or generation reads it, and
a bad one is a one-line error naming the file and the field. The format is ``formats.CHECKPOINT``; fields
added since version 1 was first written have defaults, so older checkpoints still load.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from smalti import formats
from smalti.errors import CheckpointError

_NONE = type(None)


@dataclass
class Payload:
    recipe: dict[str, Any]
    recipe_fingerprint: str
    timestamp: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: list[Any]  # every rank's random state
    sampler: dict[str, Any]
    tokenizer: str | None
    data: dict[str, Any]  # the dataset's provenance
    classes: list[str]
    policy_fingerprint: str | None
    eval_metrics: dict[str, float]
    evaluated_at: int
    algorithms: dict[str, Any]
    callbacks: dict[str, Any]
    ledger: dict[str, Any] | None  # the signed tree head and the recorder's state (a ledgered run)
    train_loss: float = math.nan  # the defaults: fields later than the first checkpoints
    wall_seconds: float = 0.0
    eval_by_class: dict[str, float] = field(default_factory=dict)
    surgery: list[Any] = field(default_factory=list)
    model: dict[str, Any] | None = None  # the tensors, where the reader asked for them
    optimizer: dict[str, Any] | None = None
    format: str = formats.CHECKPOINT

    def to_dict(self) -> dict[str, Any]:
        """The dict ``torch.save`` writes (in the key order checkpoints have always had); no tensors."""
        return {"format": self.format, **{name: getattr(self, name) for name in _ORDER}}

    @property
    def ledger_head(self) -> dict[str, Any] | None:
        return self.ledger.get("head") if self.ledger else None


_ORDER = [
    "recipe",
    "recipe_fingerprint",
    "timestamp",
    "scheduler",
    "scaler",
    "rng",
    "sampler",
    "tokenizer",
    "data",
    "classes",
    "policy_fingerprint",
    "eval_metrics",
    "train_loss",
    "wall_seconds",
    "eval_by_class",
    "evaluated_at",
    "algorithms",
    "surgery",
    "callbacks",
    "ledger",
]
_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (dict,),
    "recipe_fingerprint": (str,),
    "timestamp": (dict,),
    "scheduler": (dict,),
    "scaler": (dict, _NONE),
    "rng": (list, tuple),
    "sampler": (dict,),
    "tokenizer": (str, _NONE),
    "data": (dict,),
    "classes": (list, tuple),
    "policy_fingerprint": (str, _NONE),
    "eval_metrics": (dict,),
    "evaluated_at": (int,),
    "algorithms": (dict,),
    "callbacks": (dict,),
    "ledger": (dict, _NONE),
    "train_loss": (float, int),
    "wall_seconds": (float, int),
    "eval_by_class": (dict,),
    "surgery": (list, tuple),
    "model": (dict, _NONE),
    "optimizer": (dict, _NONE),
    "format": (str,),
}


def read_payload(raw: Any, where: str) -> Payload:
    """The payload of a loaded checkpoint, every field checked; a one-line ``CheckpointError`` otherwise."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a Smalti checkpoint (its payload is a {type(raw).__name__})")
    problem = formats.format_problem(raw.get("format"), formats.CHECKPOINT, where)
    if problem:
        raise CheckpointError(problem)
    values: dict[str, Any] = {}
    for item in fields(Payload):
        if item.name not in raw:
            if _has_default(item):
                continue
            raise CheckpointError(f"{where}: checkpoint has no {item.name!r} (damaged, or not written by Smalti)")
        value = raw[item.name]
        if isinstance(value, bool) or not isinstance(value, _TYPES[item.name]):
            expected = " or ".join("None" if t is _NONE else t.__name__ for t in _TYPES[item.name])
            raise CheckpointError(
                f"{where}: checkpoint field {item.name!r} is a {type(value).__name__}, not a {expected}"
            )
        values[item.name] = list(value) if isinstance(value, tuple) else value
    if "train_loss" in values:
        values["train_loss"] = float(values["train_loss"])
    if "wall_seconds" in values:
        values["wall_seconds"] = float(values["wall_seconds"])
    return Payload(**values)


def _has_default(item: Field) -> bool:
    return item.default is not MISSING or item.default_factory is not MISSING
