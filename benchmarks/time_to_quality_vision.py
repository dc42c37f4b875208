"""time_to_quality_vision: training time of the digits ResNet to a fixed validation accuracy,
baseline (recipes/digits.yaml) against the mild, medium and hot stacks (recipes/digits-*.yaml).

Each arm trains at several budgets (fractions of the baseline's 8 epochs), so both the baseline and
the stacks get the same chance to be cut short; an arm's time is the shortest training time (evaluation
excluded) at which any of its budgets first reached the target. Repeated over seeds; per stack, the
median over seeds of baseline time / stack time. JSON ``speedup`` is the best stack's (named in
``best_stack``), with every stack's beside it.
"""

from __future__ import annotations

import argparse
import statistics

from common import REPO, emit, machine
from time_to_quality import fastest_to_target, train_curve

from smalti.config import load_recipe

STACKS = ["digits", "digits-mild", "digits-medium", "digits-hot"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", type=float, default=0.97, help="validation accuracy to reach")
    parser.add_argument("--epochs", type=float, default=8.0, help="the baseline's full budget")
    parser.add_argument("--budgets", default="0.5,0.625,0.75,1.0", help="fractions of --epochs each arm trains for")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", default="6ba", help="evaluation interval (finer = sharper times)")
    parser.add_argument("--stacks", default=",".join(STACKS))
    args = parser.parse_args()

    budgets = [float(b) for b in args.budgets.split(",")]
    stacks = args.stacks.split(",")
    times: dict[str, list[float | None]] = {name: [] for name in stacks}
    finals: dict[str, list[float]] = {name: [] for name in stacks}
    for seed in range(1, args.seeds + 1):
        for name in stacks:
            curves = []
            for budget in budgets:
                batches = round(budget * args.epochs * 22)  # 1,437 training digits / 64 = 22 batches per epoch
                recipe = load_recipe(REPO / "recipes" / f"{name}.yaml", [
                    f"seed={seed}", f"train.max_duration={batches}ba", f"eval.interval={args.eval_every}",
                    "logging.console=false", "logging.jsonl=false", "checkpoint.interval=100000ba"])
                curve = train_curve(f"{budget:g}", recipe)
                curves.append(curve)
                finals[name].append(curve.final("eval/accuracy"))
            seconds, _ = fastest_to_target(curves, "eval/accuracy", args.target, higher_is_better=True)
            times[name].append(seconds)

    baseline = times[stacks[0]]
    speedups = {name: [b / t if b is not None and t is not None else None for b, t in zip(baseline, times[name])]
                for name in stacks[1:]}
    median = {name: statistics.median(v) if None not in v else None for name, v in speedups.items()}
    reached = {name: value for name, value in median.items() if value is not None}
    best = max(reached, key=reached.get) if reached else None
    result = {
        "benchmark": "time_to_quality_vision",
        "speedup": reached.get(best) if best else None,
        "best_stack": best,
        "goal": ">= 1.5",
        "target_accuracy": args.target,
        "speedup_by_stack": median,
        "seconds_to_target": {name: [None if t is None else round(t, 2) for t in v] for name, v in times.items()},
        "final_accuracy_median": {name: round(statistics.median(v), 4) for name, v in finals.items()},
        "budgets_epochs": [b * args.epochs for b in budgets],
        "seeds": args.seeds,
        "machine": machine(),
    }
    emit(result)


if __name__ == "__main__":
    main()
