"""shakespeare_quality: the trainer adds nothing hidden, and what the demo recipe reaches.

Part 1: with algorithms off, Smalti and the hand-written loop, from the same
seed and batches, must give the same loss curve (max abs difference <= 1e-5
over 300 steps). Part 2: train the demo recipe (recipes/shakespeare.yaml) and
report the validation loss reached and the wall time it took.
"""

from __future__ import annotations

import argparse
import tempfile

from common import REPO, baby_recipe, emit, handwritten_losses, machine

from smalti.build import build_data
from smalti.config import load_recipe
from smalti.distributed import DistInfo
from smalti.loggers.jsonl import read_metrics
from smalti.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip-demo", action="store_true", help="only the loss-curve comparison")
    args = parser.parse_args()

    recipe = baby_recipe(args.steps)
    data = build_data(recipe, DistInfo())
    hand_losses = handwritten_losses(recipe, data, args.steps)
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(recipe, run_dir, data=data).fit()
        records = read_metrics(f"{run_dir}/metrics.jsonl")
    smalti_losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert len(smalti_losses) == len(hand_losses) == args.steps
    max_diff = max(abs(a - b) for a, b in zip(smalti_losses, hand_losses))

    result = {
        "benchmark": "shakespeare_quality",
        "max_abs_loss_diff": max_diff,
        "goal": "<= 1e-5",
        "steps": args.steps,
        "first_loss": round(smalti_losses[0], 4),
        "last_loss": round(smalti_losses[-1], 4),
    }
    if not args.skip_demo:
        demo = load_recipe(REPO / "recipes" / "shakespeare.yaml", ["logging.console=false"])
        with tempfile.TemporaryDirectory() as run_dir:
            fit = Trainer(demo, run_dir).fit()
        result.update({
            "demo_val_loss": round(fit.eval_metrics["eval/loss"], 4),
            "demo_train_seconds": round(fit.seconds, 1),
            "demo_tokens_per_s": round(fit.tokens_per_second),
            "demo_batches": fit.timestamp.batch,
        })
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
