"""Which example each row of a module's input came from, where a model reshapes or gathers its batch.

The router splits a module's input by examples (``smalti.governance.routing``). Most modules see the batch as
their first dimension; a mixture-of-experts block does not: it flattens the batch to one row per token, and
each expert runs on the tokens gathered for it. The code that reshapes or gathers says what it did, here, and
the router maps rows back to examples from it, without having to trust a shape that merely divides evenly.

``positions`` index the batch-major flattened ``[batch * tokens]`` rows (token ``t`` of example ``b`` is
``b * tokens + t``); ``None`` means all of them, in order.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass(frozen=True)
class GatheredRows:
    positions: torch.Tensor | None  # flattened token positions of the input's rows; None: every one, in order
    total: int  # batch * tokens: how many flattened positions there are

    @property
    def count(self) -> int:
        return self.total if self.positions is None else int(self.positions.shape[0])

    def examples(self, batch_rows: int) -> torch.Tensor:
        """The example (0..batch_rows-1) each input row belongs to."""
        if self.total % batch_rows:
            raise ValueError(f"{self.total} flattened rows do not split into {batch_rows} examples")
        positions = torch.arange(self.total) if self.positions is None else self.positions.cpu()
        return torch.div(positions, self.total // batch_rows, rounding_mode="floor")


_CURRENT: ContextVar[GatheredRows | None] = ContextVar("smalti_gathered_rows", default=None)


def current() -> GatheredRows | None:
    return _CURRENT.get()


@contextlib.contextmanager
def gathered(positions: torch.Tensor | None, total: int) -> Iterator[None]:
    """Modules called inside see rows that are these flattened positions of the batch."""
    token = _CURRENT.set(GatheredRows(positions, total))
    try:
        yield
    finally:
        _CURRENT.reset(token)
