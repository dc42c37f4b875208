"""shakespeare_quality: the trainer adds nothing hidden.

With algorithms off, Smalti and the hand-written loop, from the same seed and
batches, must give the same loss curve (max abs difference <= 1e-5 over 300
steps). What the demo recipe reaches, and how long `make demo` takes, is
benchmarks/demo.py's (docs/demo.json), so the docs state one figure.
"""

from __future__ import annotations

import argparse
import tempfile

from common import baby_recipe, emit, handwritten_losses, machine

from smalti.build import build_data
from smalti.distributed import DistInfo
from smalti.loggers.jsonl import read_metrics
from smalti.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
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
    result["machine"] = machine()
    emit(result)


if __name__ == "__main__":
    main()
