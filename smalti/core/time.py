"""Training time in the units people actually schedule in.

A learning-rate warmup is naturally "100 batches", a data mix "0.5 of training",
a checkpoint interval "1 epoch". ``Time`` is a value with one of those units and
``Timestamp`` is where training is now, counted in all of them at once, so any
``Time`` can be compared with it without the caller converting anything.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Union


class TimeUnit(str, Enum):
    """The five units; the string value is the suffix used in recipes."""

    EPOCH = "ep"
    BATCH = "ba"
    SAMPLE = "sp"
    TOKEN = "tok"
    DURATION = "dur"


_TIME_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|ba|sp|tok|dur)\s*$")

TimeLike = Union["Time", str]


@dataclass(frozen=True)
class Time:
    """An amount of training time: ``Time(2, TimeUnit.EPOCH)`` or ``Time.parse('2ep')``.

    ``dur`` is a fraction of the run's ``max_duration`` and may be fractional;
    ``ep``, ``ba``, ``sp`` and ``tok`` are counts and must be whole numbers
    (``'1e6tok'`` is fine, ``'1.5ba'`` is not).
    """

    value: float
    unit: TimeUnit

    def __post_init__(self) -> None:
        if self.value < 0:
            raise ValueError(f"time must not be negative: {self.value}{self.unit.value}")
        if self.unit is not TimeUnit.DURATION:
            if float(self.value) != int(self.value):
                raise ValueError(f"'{self.value}{self.unit.value}' is not a whole number of {self.unit.name.lower()}s")
            object.__setattr__(self, "value", int(self.value))
        else:
            object.__setattr__(self, "value", float(self.value))

    @classmethod
    def parse(cls, text: TimeLike) -> "Time":
        """Parse ``'2ep'``, ``'500ba'``, ``'12000sp'``, ``'1e6tok'``, ``'0.25dur'``."""
        if isinstance(text, Time):
            return text
        if not isinstance(text, str):
            raise ValueError(f"expected a time such as '500ba' or '0.5dur', got {text!r}")
        match = _TIME_RE.match(text)
        if match is None:
            raise ValueError(
                f"invalid time {text!r}: expected a number followed by one of ep, ba, sp, tok, dur "
                "(e.g. '2ep', '500ba', '1e6tok', '0.25dur')"
            )
        return cls(float(match.group(1)), TimeUnit(match.group(2)))

    def _check_unit(self, other: "Time") -> None:
        if not isinstance(other, Time):
            raise TypeError(f"cannot combine Time with {type(other).__name__}")
        if other.unit is not self.unit:
            raise ValueError(f"cannot combine {self} and {other}: different units")

    def __add__(self, other: "Time") -> "Time":
        self._check_unit(other)
        return Time(self.value + other.value, self.unit)

    def __sub__(self, other: "Time") -> "Time":
        self._check_unit(other)
        return Time(self.value - other.value, self.unit)

    def __mul__(self, factor: float) -> "Time":
        value = self.value * factor
        if self.unit is not TimeUnit.DURATION:
            value = int(round(value))
        return Time(value, self.unit)

    __rmul__ = __mul__

    def __truediv__(self, other: "Time") -> float:
        """The ratio of two times of the same unit (how many ``other`` fit in ``self``)."""
        self._check_unit(other)
        return self.value / other.value

    def __lt__(self, other: "Time") -> bool:
        self._check_unit(other)
        return self.value < other.value

    def __le__(self, other: "Time") -> bool:
        self._check_unit(other)
        return self.value <= other.value

    def __gt__(self, other: "Time") -> bool:
        self._check_unit(other)
        return self.value > other.value

    def __ge__(self, other: "Time") -> bool:
        self._check_unit(other)
        return self.value >= other.value

    def __str__(self) -> str:
        if self.unit is TimeUnit.DURATION:  # short when that is exact; never rounded (recipes store this)
            short = f"{self.value:g}"
            return f"{short if float(short) == self.value else repr(self.value)}dur"
        return f"{self.value}{self.unit.value}"

    def __repr__(self) -> str:
        return f"Time('{self}')"


@dataclass(frozen=True)
class Timestamp:
    """Where training is, in every count at once.

    Immutable: the trainer replaces it after each batch and epoch, so a
    reference an algorithm holds never changes under it.
    """

    epoch: int = 0
    batch: int = 0
    sample: int = 0
    token: int = 0
    batch_in_epoch: int = 0
    sample_in_epoch: int = 0
    token_in_epoch: int = 0

    def get(self, unit: TimeUnit) -> int:
        if unit is TimeUnit.EPOCH:
            return self.epoch
        if unit is TimeUnit.BATCH:
            return self.batch
        if unit is TimeUnit.SAMPLE:
            return self.sample
        if unit is TimeUnit.TOKEN:
            return self.token
        raise ValueError("a Timestamp has no absolute 'dur' count; use State.elapsed_fraction")

    def after_batch(self, samples: int, tokens: int) -> "Timestamp":
        return replace(
            self,
            batch=self.batch + 1,
            sample=self.sample + samples,
            token=self.token + tokens,
            batch_in_epoch=self.batch_in_epoch + 1,
            sample_in_epoch=self.sample_in_epoch + samples,
            token_in_epoch=self.token_in_epoch + tokens,
        )

    def after_epoch(self) -> "Timestamp":
        return replace(self, epoch=self.epoch + 1, batch_in_epoch=0, sample_in_epoch=0, token_in_epoch=0)

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, int]) -> "Timestamp":
        return cls(**{k: int(v) for k, v in state.items()})

    def describe(self) -> str:
        return f"ep{self.epoch} ba{self.batch} sp{self.sample} tok{self.token}"
