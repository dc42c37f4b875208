"""Which example each row of a module's input came from, where a model reshapes or gathers its batch.

The router splits a module's input by examples (``smalti.governance.routing``). Most modules see the batch as
their first dimension; a mixture-of-experts block does not: it flattens the batch to one row per token, and
each expert runs on the tokens gathered for it. The code that reshapes or gathers says what it did, here, and
the router maps rows back to examples from it, without having to trust a shape that merely divides evenly.

``positions`` index the batch-major flattened ``[batch * tokens]`` rows (token ``t`` of example ``b`` is
``b * tokens + t``); ``None`` means all of them, in order.

``set_rows`` is the other half: before every forward pass, whoever runs the model says which examples the rows
are (their classes, for per-class adapters; their ids, for a model that draws randomness per example).
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from smalti.core.batch import Batch


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


def set_rows(model: "torch.nn.Module", batch: "Batch", draw: int | None = None) -> None:
    """Tell the model which examples the next forward pass runs: their classes (per-class adapters gate by them)
    and, for a model that draws per-example randomness (a diffusion model's noise), their ids and ``draw``, the
    pass they are drawn for (a training step's batch number; None for evaluation)."""
    from smalti.models.adapters import set_row_classes

    set_row_classes(model, batch.provenance)
    receiver = getattr(model, "set_row_examples", None)
    if receiver is not None:
        receiver(batch.sample_ids, draw)
