"""Model surgery: the one place where algorithms change the model's structure, in a fixed order.

Surgery runs once, in ``Trainer.__init__``, right after the model is built
and before the optimizer, DDP, ``torch.compile``, the routing policy check
and checkpoint loading see it. So the optimizer holds the new parameters,
a policy is bound to the model as trained, and a checkpoint's state dict
fits the resumed model because the same surgery ran first.

Why a fixed order rather than recipe order: surgeries interact, and the
result must not depend on how a recipe happens to list them. The order,
and the reason for each place in it:

1. ``NoOpModel``: replaces the whole model; everything after finds nothing.
2. ``GatedLinearUnits``, then ``Alibi``: replace GPT sub-modules wholesale.
3. ``Factorize``: may factorize the linear layers GLU just created.
4. ``SqueezeExcite``, then ``BlurPool``: wrap convolutions (blur applies to
   the strided ones, squeeze-excite reweights their output).
5. ``WeightStandardization``: parametrizes the convolutions that exist now.
6. ``GhostBatchNorm``: swaps batch norms.
7. ``StochasticDepth``: wraps whole residual blocks, after their insides
   are final.
8. ``GyroDropout``: swaps dropout modules.
9. ``LowPrecisionLayerNorm``, ``LowPrecisionGroupNorm``: swap norms last, so
   norms added by earlier surgery are covered too.
10. ``ChannelsLast``: changes memory format of every parameter, so last.

Each surgery is idempotent: applying it to an already-operated model is a
no-op (``apply_surgery`` records what ran in ``model.smalti_surgery``, and
each functional form skips modules it already replaced).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

SURGERY_ORDER: tuple[str, ...] = (
    "NoOpModel",
    "GatedLinearUnits",
    "Alibi",
    "Factorize",
    "SqueezeExcite",
    "BlurPool",
    "WeightStandardization",
    "GhostBatchNorm",
    "StochasticDepth",
    "GyroDropout",
    "LowPrecisionLayerNorm",
    "LowPrecisionGroupNorm",
    "ChannelsLast",
)

SURGERY_ATTRIBUTE = "smalti_surgery"


@runtime_checkable
class Surgeon(Protocol):
    """An algorithm that changes the model's structure implements ``surgery``."""

    name: str

    def surgery(self, model: torch.nn.Module) -> torch.nn.Module: ...


def surgeons(algorithms: Sequence[object]) -> list[Surgeon]:
    """The algorithms that do surgery, in ``SURGERY_ORDER`` (an unlisted one is a programming error)."""
    found = [a for a in algorithms if isinstance(a, Surgeon)]
    for algorithm in found:
        if algorithm.name not in SURGERY_ORDER:
            raise ValueError(
                f"{algorithm.name} does model surgery but has no place in SURGERY_ORDER "
                "(smalti/core/surgery.py): add it there, with the reason"
            )
    return sorted(found, key=lambda a: SURGERY_ORDER.index(a.name))


def apply_surgery(model: torch.nn.Module, algorithms: Sequence[object]) -> torch.nn.Module:
    """Apply every surgery in the fixed order; returns the (possibly replaced) model.

    The names of the surgeries applied are kept on the model, so calling
    this again (a resumed trainer, a user applying it twice) changes nothing.
    """
    done: list[str] = list(getattr(model, SURGERY_ATTRIBUTE, []))
    for surgeon in surgeons(algorithms):
        if surgeon.name in done:
            continue
        model = surgeon.surgery(model)
        done.append(surgeon.name)
    setattr(model, SURGERY_ATTRIBUTE, done)
    return model


def applied_surgery(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, SURGERY_ATTRIBUTE, []))
