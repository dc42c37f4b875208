"""deletion_tradeoff: what the deletion-aware order costs in quality, and what it saves a deletion.

The deletion_cost setup (baby GPT, three comedies, one epoch, deterministic, ledger on), trained
twice from the same seed: with The Comedy of Errors placed last (``data.late_classes``, plus the
kept checkpoint before it) and in the ordinary shuffled order. For each: the held-out loss per class
and overall, and the deletion plan for that class from the verified ledger (steps to replay, against
a full retrain). JSON ``ratio`` = the late order's replayed share / the shuffled order's.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import emit, machine
from deletion_cost import FORGET, add_setup_arguments, fit, latest, prepare

from smalti.workflows.deletion import loss_by_class, plan_deletion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-samples", type=int, default=480)
    add_setup_arguments(parser)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        setup = prepare(root, args.batch_size, args.tiny)
        steps = setup.per_epoch
        arms = {}
        for name, late in (("late", True), ("shuffled", False)):
            config = setup.recipe(steps)
            if not late:
                config = config.model_copy(update={"data": config.data.model_copy(update={"late_classes": []})})
            run = root / name
            fit(config, run)
            plan = plan_deletion(run, FORGET)
            losses = loss_by_class(run / "recipe.yaml", latest(run), args.eval_samples)
            arms[name] = {
                "first_step_of_class": plan.first_step,
                "steps_to_replay": plan.steps_to_replay,
                "replayed_share": round(plan.steps_to_replay / plan.total_steps, 4),
                "forgotten_class_loss": losses[FORGET],
                "other_classes_mean_loss": round(sum(v for k, v in losses.items() if k != FORGET)
                                                 / max(1, len(losses) - 1), 6),
                "checkpoints_kept": len(list((run / "checkpoints").glob("*.pt"))),
            }
    late, shuffled = arms["late"], arms["shuffled"]
    emit({
        "benchmark": "deletion_tradeoff",
        "ratio": round(late["replayed_share"] / max(shuffled["replayed_share"], 1e-9), 4),
        "late": late,
        "shuffled": shuffled,
        "forgotten_class_loss_cost": round(late["forgotten_class_loss"] - shuffled["forgotten_class_loss"], 6),
        "other_classes_loss_cost": round(late["other_classes_mean_loss"] - shuffled["other_classes_mean_loss"], 6),
        "steps": steps,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
