"""Schedule-free AdamW (Defazio et al., 2024) as Smalti trains with it: always in training mode, with the
point it evaluates at computed on the side.

The optimizer keeps two sequences per parameter: ``z``, the base iterate (in its state), and the parameter
itself, which holds ``y``, the point gradients are taken at. The model it means to produce is ``x``, an
average of the ``z``s, recoverable as ``x = y + (1 - 1/beta1)(z - y)``. The package's own ``eval()`` and
``train()`` move the parameters from ``y`` to ``x`` and back in place, which in floating point does not give
back ``y`` bit for bit, and every later step would differ from a run that evaluated at other times. So the
optimizer stays in training mode; an evaluation puts ``x`` in, and the saved ``y`` back exactly
(``evaluation_weights``); sampling and export compute ``x`` from a checkpoint (``evaluation_point``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from schedulefree import AdamWScheduleFree


class ScheduleFreeAdamW(AdamWScheduleFree):
    def __init__(self, params: Any, **options: Any) -> None:
        super().__init__(params, **options)
        super().train()  # ``y`` in the parameters, for good

    def train(self, mode: bool = True) -> None:
        """A no-op: see the module docstring (the parameters always hold ``y``)."""

    def eval(self) -> None:
        raise RuntimeError("ScheduleFreeAdamW stays in training mode; use evaluation_weights()")

    @contextlib.contextmanager
    @torch.no_grad()
    def evaluation_weights(self) -> Iterator[None]:
        """``x`` in the parameters while the block runs; ``y`` back, bitwise, after."""
        saved: list[tuple[torch.Tensor, torch.Tensor]] = []
        for group in self.param_groups:
            beta1 = group["betas"][0]
            for p in group["params"]:
                z = self.state[p].get("z")
                if z is not None:
                    saved.append((p, p.detach().clone()))
                    p.copy_(evaluation_point(p, z, beta1))
        try:
            yield
        finally:
            for p, y in saved:
                p.copy_(y)


def evaluation_point(y: torch.Tensor, z: torch.Tensor, beta1: float) -> torch.Tensor:
    """``x`` from ``y`` and ``z``: what the package's ``eval()`` computes, out of place."""
    return torch.lerp(y.detach(), z.to(y.device, y.dtype), 1 - 1 / beta1)
