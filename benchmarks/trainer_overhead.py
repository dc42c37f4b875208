"""trainer_overhead: Smalti's Trainer vs a hand-written PyTorch loop, same baby GPT, same batches.

The two loops run interleaved step by step in one process: after each
Smalti step a callback runs one hand-written step on its own model and
optimizer, and both are timed. On a shared 2-core machine the speed of
identical steps drifts by 30% over seconds; pairing the steps exposes both
loops to the same conditions. Reports ratio = median Smalti step time /
median hand-written step time over all steps of several runs (goal <= 1.01),
and the median of the per-run ratios. Smalti runs as a user would: JSONL
metrics every step, LR schedule, clipping.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import HandwrittenLoop, PairedSteps, baby_recipe, emit, machine

from smalti.build import build_data
from smalti.distributed import DistInfo
from smalti.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    recipe = baby_recipe(args.steps)
    data = build_data(recipe, DistInfo())
    warmup = HandwrittenLoop(recipe, data, 10)
    for _ in range(10):
        warmup.step()
    smalti: list[float] = []
    hand: list[float] = []
    per_run = []
    for _ in range(args.runs):
        pairs = PairedSteps(HandwrittenLoop(recipe, data, args.steps))
        with tempfile.TemporaryDirectory() as run_dir:
            Trainer(recipe, run_dir, data=data, callbacks=[pairs]).fit()
        smalti += pairs.smalti
        hand += pairs.handwritten
        per_run.append(statistics.median(pairs.smalti) / statistics.median(pairs.handwritten))
    median = statistics.median
    emit({
        "benchmark": "trainer_overhead",
        "ratio": round(median(smalti) / median(hand), 4),
        "goal": "<= 1.01",
        "steps": args.steps,
        "runs": args.runs,
        "smalti_step_ms_median": round(1000 * median(smalti), 3),
        "handwritten_step_ms_median": round(1000 * median(hand), 3),
        "per_run_ratios": [round(r, 4) for r in per_run],
        "median_per_run_ratio": round(median(per_run), 4),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
