"""time_to_quality_gpt: the baby GPT on Shakespeare, baseline (no algorithms) against the speed stack
(the ``algorithms`` of recipes/shakespeare-speed.yaml), in the same run.

The target is the baseline's final validation loss at its full budget (per seed). Each arm trains at
several budgets (fractions of the full one, the schedule compressed to fit), and its time is the shortest
training time (evaluation excluded) at which any budget first reached the target. JSON ``speedup`` =
median over seeds of baseline time / stack time.
"""

from __future__ import annotations

import argparse
import statistics

import yaml
from common import REPO, baby_recipe, emit, machine
from time_to_quality import fastest_to_target, train_curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=400, help="the baseline's full budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--budgets", default="0.5,0.75,1.0", help="fractions of --steps each arm trains for")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-samples", type=int, default=512)
    parser.add_argument("--stack", default=str(REPO / "recipes" / "shakespeare-speed.yaml"),
                        help="recipe whose algorithms form the stack")
    args = parser.parse_args()

    stack = yaml.safe_load(open(args.stack, encoding="utf-8"))["algorithms"]
    budgets = [float(b) for b in args.budgets.split(",")]

    def recipe(seed: int, budget: float, algorithms: dict):
        steps = round(budget * args.steps)
        return baby_recipe(steps, args.batch_size, seed=seed, algorithms=algorithms,
                           scheduler={"warmup": f"{max(1, steps // 20)}ba"},
                           eval={"interval": f"{args.eval_every}ba", "max_samples": args.eval_samples},
                           logging={"jsonl": False})

    times: dict[str, list[float | None]] = {"baseline": [], "stack": []}
    targets, stack_finals = [], []
    for seed in range(1, args.seeds + 1):
        baseline = [train_curve(f"{b:g}", recipe(seed, b, {})) for b in budgets]
        target = baseline[budgets.index(max(budgets))].final("eval/loss")
        targets.append(target)
        times["baseline"].append(fastest_to_target(baseline, "eval/loss", target, higher_is_better=False)[0])
        stacked = [train_curve(f"{b:g}", recipe(seed, b, stack)) for b in budgets]
        stack_finals.append(stacked[-1].final("eval/loss"))
        times["stack"].append(fastest_to_target(stacked, "eval/loss", target, higher_is_better=False)[0])

    speedups = [b / s if b and s else None for b, s in zip(times["baseline"], times["stack"])]
    emit({
        "benchmark": "time_to_quality_gpt",
        "speedup": statistics.median(speedups) if None not in speedups else None,
        "goal": ">= 1.5",
        "per_seed_speedup": [None if s is None else round(s, 3) for s in speedups],
        "seconds_to_target": {k: [None if t is None else round(t, 2) for t in v] for k, v in times.items()},
        "target_eval_loss": [round(t, 4) for t in targets],
        "stack_final_eval_loss_full_budget": [round(t, 4) for t in stack_finals],
        "stack": stack,
        "steps": args.steps,
        "budgets": budgets,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
