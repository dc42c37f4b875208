"""Deletion cost: forgetting a class that entered at 75% of training, exactly, vs retraining without it.

The baby GPT on three signed Shakespeare plays plus a fourth, The Comedy of
Errors, placed last in the epoch (``data.late_classes``, the deletion-aware
order) so that it first appears at 75% of the run; the other plays are left
out (``data.exclude_classes``) to keep the run short. The parent run trains
with the ledger on and deterministic mode. Then, in the same process:

- ``forget``: ``smalti forget --mode exact`` (plan from the ledger, replay
  from the kept checkpoint before the class, sign the certificate with the
  per-class held-out losses before and after), timed whole;
- ``retrain``: the counterfactual, the same recipe with the class excluded
  from the start, timed whole.

Every run ends as training does, with the recipe's evaluation (here on
``--eval-samples`` held-out windows), which records each class's loss in the
final checkpoint: the certificate's "before" is the parent's, its "after" the
replay's, and the retrain pays the same final evaluation.

``ratio`` = forget time / retrain time (goal <= 0.3), ``bitwise_equal``:
whether the two final weights are identical, and the forgotten class's
held-out loss after forgetting next to the counterfactual's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import BABY_GPT, emit, governed_shakespeare, machine

from smalti.config import Recipe
from smalti.checkpoint import CheckpointStore
from smalti.workflows.deletion import loss_by_class, weights_sha256
from smalti.workflows.forget import forget
from smalti.trust.keys import SigningKey, write_key_pair
from smalti.trainer import Trainer

FORGET = "gutenberg/comedy/comedy_of_errors"
KEEP = {FORGET, "gutenberg/comedy/as_you_like_it", "gutenberg/comedy/alls_well_that_ends_well"}


TINY_GPT = dict(n_layer=1, n_head=2, d_model=32, block_size=64)  # smoke tests: the same run, far less compute


def recipe(governed, key: Path, classes: list[str], steps: int | None, exclude_forgotten: bool = False,
           batch_size: int = 12, tiny: bool = False, eval_samples: int = 12) -> Recipe:
    excluded = [c for c in classes if c not in KEEP] + ([FORGET] if exclude_forgotten else [])
    return Recipe.model_validate({
        "seed": 1,
        "model": dict(TINY_GPT if tiny else BABY_GPT),
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": "random", "exclude_classes": excluded, "late_classes": [FORGET],
                 "verify": "lazy"},  # both arms verify each shard as they read it (forget's replay does)
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "10ba"},
        "train": {"max_duration": f"{steps or 1}ba", "global_batch_size": batch_size, "grad_clip_norm": 1.0,
                  "deterministic": True},
        "eval": {"interval": "1000000ba", "max_samples": eval_samples},  # the final evaluation only
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"ledger": {"enabled": True, "key": str(key), "entropy_every": 50, "flush_every": 50}},
    })


@dataclass
class Setup:
    """The governed Shakespeare dataset, a trainer key, the plays, and where the forgotten class begins."""

    governed: Any
    key: Path
    classes: list[str]
    late: int
    per_epoch: int
    batch_size: int
    tiny: bool
    eval_samples: int = 12

    def recipe(self, steps: int | None, exclude_forgotten: bool = False) -> Recipe:
        return recipe(self.governed, self.key, self.classes, steps, exclude_forgotten, self.batch_size, self.tiny,
                      self.eval_samples)


def prepare(root: Path, batch_size: int = 12, tiny: bool = False, eval_samples: int = 12) -> Setup:
    from smalti.trust.taxonomy import Taxonomy

    governed = governed_shakespeare(root)
    key, _ = write_key_pair("trainer", root / "trainer-key")
    nodes = list(Taxonomy.parse(governed.taxonomy.read_bytes(), str(governed.taxonomy)).classes)
    classes = [c for c in nodes if not any(other.startswith(c + "/") for other in nodes)]  # the plays
    probe = Trainer(recipe(governed, key, classes, None, batch_size=batch_size, tiny=tiny), root / "probe")
    late, per_epoch = probe.data.first_late_batch(), probe.data.shape.batches_per_epoch
    probe.close()
    return Setup(governed, key, classes, late, per_epoch, batch_size, tiny, eval_samples)


def latest(run: Path) -> Path:
    found = CheckpointStore(run / "checkpoints", keep=1).latest()
    assert found is not None, run
    return found


def fit(config: Recipe, run_dir: Path) -> Trainer:
    trainer = Trainer(config, run_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def add_setup_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :func:`prepare`, shared by the deletion benchmarks."""
    parser.add_argument("--batch-size", type=int, default=12, help="larger: fewer, bigger steps (smoke tests)")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer, 32-wide GPT (smoke tests)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3, help="forget/retrain pairs (the parent is trained once)")
    parser.add_argument("--eval-samples", type=int, default=240, help="held-out windows of every run's final "
                        "evaluation (the certificate's before/after losses per class)")
    add_setup_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = prepare(root, args.batch_size, args.tiny, args.eval_samples)
        key, late = setup.key, setup.late
        steps = min(setup.per_epoch, round(late / 0.75))
        parent = root / "parent"
        fit(setup.recipe(steps), parent)
        ratios, forget_s, retrain_s, equal, losses = [], [], [], [], []
        for run in range(args.runs):
            started = time.perf_counter()
            certificate = forget(parent, FORGET, root / f"forgot-{run}", SigningKey.load(key), "exact")
            forget_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            fit(setup.recipe(steps, exclude_forgotten=True), root / f"retrain-{run}")
            retrain_s.append(time.perf_counter() - started)
            ratios.append(forget_s[-1] / retrain_s[-1])
            a, b = latest(root / f"forgot-{run}"), latest(root / f"retrain-{run}")
            equal.append(weights_sha256(torch.load(a, weights_only=False)["model"])
                         == weights_sha256(torch.load(b, weights_only=False)["model"]))
            counterfactual = loss_by_class(root / f"retrain-{run}" / "recipe.yaml", b)  # evaluated anew
            assert certificate["evaluation"]["max_samples"] == args.eval_samples, certificate["evaluation"]
            losses.append((certificate["evaluation"]["before"][FORGET], certificate["evaluation"]["after"][FORGET],
                           counterfactual[FORGET]))
    emit({
        "benchmark": "deletion_cost",
        "ratio": round(statistics.median(ratios), 4),
        "goal": "<= 0.3, bitwise equal",
        "bitwise_equal": all(equal),
        "ratios": [round(r, 4) for r in ratios],
        "forget_s": [round(s, 2) for s in forget_s],
        "retrain_s": [round(s, 2) for s in retrain_s],
        "steps": steps,
        "class_enters_at_step": late + 1,
        "forgotten_class_loss": {"parent": losses[0][0], "after_forget": losses[0][1], "counterfactual": losses[0][2]},
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
