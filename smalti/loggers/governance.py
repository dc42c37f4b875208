"""The governance signals trackers show beside the loss: a policy at work, not only a loss curve.

All of them are numbers the ledger already computes for its entries; this module only picks them out, at the
logging interval, when a tracker is on (``Logger.wants_governance``):

- ``governance/share/<layer>/<signature>``: each class's (routing signature's) share of the layer's gradient in
  the step, for the layers ``logging.governance_layers`` chooses (the ledger's contribution rule);
- ``governance/layers_updated`` and ``governance/layers_frozen``, and ``governance/updated/<layer>`` (1 or 0);
- ``governance/entropy/<layer>/<class>``: the entropy probe, at the steps it is measured;
- ``governance/phase``: the routing policy's phase, logged at every logged step and at every phase change.

The ledger stays the evidence (signed, verifiable); a tracker is a view of it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass
class StepSignals:
    """One committed step's per-layer numbers on the host: what its ledger entry packs, and what trackers are
    shown. Defined here, below the ledger, so that this view of it never imports the ledger."""

    step: int
    signatures: list[str]
    shares: np.ndarray  # [signatures, layers]: share of each layer's gradient
    updated: np.ndarray  # [layers]: the layer moved in this step
    entropy: np.ndarray | None  # [probe classes, probe layers], at the steps it is measured


class GovernanceSignals:
    """Called by the ledger with the steps it has just committed; logs the chosen numbers of each."""

    def __init__(
        self,
        log: Callable[[int, dict[str, float]], None],
        layer_names: Sequence[str],
        layer_patterns: Sequence[str],
        every: int,
        phase_starts: Sequence[int] = (0,),
        entropy_layers: Sequence[str] = (),
        entropy_classes: Sequence[str] = (),
    ) -> None:
        self.log, self.every = log, max(1, every)
        self.layer_names = list(layer_names)
        self.chosen = [
            i
            for i, name in enumerate(layer_names)
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in layer_patterns)
        ]
        self.phase_starts = list(phase_starts) or [0]
        self.entropy_layers, self.entropy_classes = list(entropy_layers), list(entropy_classes)

    def phase_of(self, step: int) -> int:
        """The phase step ``step`` (1-based) trained in: the one holding batch index ``step - 1``."""
        return int(np.searchsorted(self.phase_starts, step - 1, side="right")) - 1

    def __call__(self, steps: Sequence[StepSignals]) -> None:
        for signals in steps:
            phase = self.phase_of(signals.step)
            changed = signals.step == 1 or phase != self.phase_of(signals.step - 1)
            metrics: dict[str, float] = {}
            if signals.step % self.every == 0 or changed:
                metrics["governance/phase"] = float(phase)
                metrics["governance/layers_updated"] = float(signals.updated.sum())
                metrics["governance/layers_frozen"] = float(len(signals.updated) - signals.updated.sum())
                for layer in self.chosen:
                    name = self.layer_names[layer]
                    metrics[f"governance/updated/{name}"] = float(signals.updated[layer])
                    for row, signature in enumerate(signals.signatures):
                        if layer < signals.shares.shape[1]:
                            metrics[f"governance/share/{name}/{signature}"] = float(signals.shares[row, layer])
            if signals.entropy is not None:
                for c, class_name in enumerate(self.entropy_classes):
                    for j, layer_name in enumerate(self.entropy_layers):
                        metrics[f"governance/entropy/{layer_name}/{class_name}"] = float(signals.entropy[c, j])
            if metrics:
                self.log(signals.step, metrics)
