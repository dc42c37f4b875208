"""algorithm_pareto: training time and final quality of each algorithm alone, and of the shipped stacks.

Image methods run on the digits ResNet (recipes/digits.yaml at ``--epochs``), text methods on the baby
GPT (``--steps``), each with the options of ``VISION``/``TEXT`` below, in one run on one machine. The
baseline runs three times per task (first, in the middle, last) and its median is the reference, so
a drift of the machine during the run shows up instead of skewing every ratio. Prints one JSON line (``ratio``: the fastest arm's time
against its baseline) and, with ``--markdown FILE``, writes the table docs/algorithms.md quotes.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import yaml
from common import REPO, baby_recipe, emit, machine
from time_to_quality import train_curve

from smalti.config import load_recipe

# Methods that only change the model on a GPU (low-precision norms, channels-last) are measured too:
# on this CPU they show what they cost, not what they save.
VISION = {
    "augmix": {"severity": 3, "width": 3}, "blurpool": {}, "channels_last": {}, "colout": {},
    "cutmix": {"alpha": 1.0}, "cutout": {"length": 0.25}, "ema": {"half_life": "3ba"}, "factorize": {"min_channels": 32},
    "ghost_batchnorm": {"ghost_batch_size": 16}, "gradient_clipping": {"clipping_type": "adaptive"},
    "gyro_dropout": {}, "label_smoothing": {"smoothing": 0.1}, "low_precision_groupnorm": {},
    "mixup": {"alpha": 0.2}, "noop_model": {}, "progressive_resizing": {"delay_fraction": 0.3},
    "randaugment": {"depth": 1, "severity": 9}, "sam": {"interval": 2}, "selective_backprop": {},
    "squeeze_excite": {"min_channels": 32, "latent_channels": 8}, "stochastic_depth": {"drop_rate": 0.1},
    "swa": {"swa_start": "0.75dur", "swa_end": "0.95dur", "update_interval": "2ba"}, "weight_standardization": {},
}
TEXT = {
    "alibi": {}, "ema": {"half_life": "20ba"}, "factorize": {"min_features": 128, "latent_features": 0.5},
    "gated_linear_units": {}, "label_smoothing": {"smoothing": 0.05},
    "layer_freezing": {"freeze_start": 0.5, "freeze_level": 0.5}, "low_precision_layernorm": {},
    "selective_backprop": {"keep": 0.5}, "sequence_length_warmup": {"duration": "0.3dur", "min_seq_length": 8,
                                                                    "step_size": 8},
    "stochastic_depth": {"drop_rate": 0.1}, "gradient_clipping": {"clipping_type": "adaptive", "clipping_threshold": 0.05},
}


def vision_arm(algorithms: dict, epochs: float, seed: int):
    recipe = load_recipe(REPO / "recipes" / "digits.yaml", [
        f"seed={seed}", f"train.max_duration={round(epochs * 22)}ba", "eval.interval=100000ba",
        "logging.console=false", "logging.jsonl=false", "checkpoint.interval=100000ba"])
    recipe = recipe.model_copy(update={"algorithms": algorithms})
    curve = train_curve("x", recipe)
    return curve.points[-1][0], curve.final("eval/accuracy")


def text_arm(algorithms: dict, steps: int, seed: int):
    recipe = baby_recipe(steps, 16, seed=seed, algorithms=algorithms, eval={"interval": "100000ba", "max_samples": 512},
                         logging={"jsonl": False})
    curve = train_curve("x", recipe)
    return curve.points[-1][0], curve.final("eval/loss")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated method names, 'stacks' for the shipped "
                        "stacks (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--baseline-runs", type=int, default=3, choices=[1, 2, 3],
                        help="baseline runs per task, spread over the invocation (their median is the reference)")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))

    stacks = {"vision": [(f"stack: {s}", yaml.safe_load(open(REPO / "recipes" / f"digits-{s}.yaml"))["algorithms"])
                         for s in ("mild", "medium", "hot")],
              "text": [("stack: speed", yaml.safe_load(open(REPO / "recipes" / "shakespeare-speed.yaml"))["algorithms"])]}
    arms = []
    for task, methods in (("vision", VISION), ("text", TEXT)):
        chosen = [(n, {n: o}) for n, o in methods.items() if not only or n in only]
        chosen += stacks[task] if not only or "stacks" in only else []
        middle = len(chosen) // 2  # the baseline runs three times (start, middle, end): the machine drifts
        repeats = [("baseline", {})] if args.baseline_runs >= 2 else []
        arms += [(task, b, m) for b, m in [("baseline", {})] + chosen[:middle] + repeats[:1]
                 + chosen[middle:] + (repeats if args.baseline_runs >= 3 else [])]
    measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for task, name, algorithms in arms:
        for s in range(1, args.seeds + 1):
            result = vision_arm(algorithms, args.epochs, s) if task == "vision" else text_arm(algorithms, args.steps, s)
            measured.setdefault((task, name), []).append(result)
    rows = [{"task": task, "method": name, "seconds": statistics.median(r[0] for r in results),
             "quality": statistics.median(r[1] for r in results), "runs": len(results)}
            for (task, name), results in measured.items()]

    for row in rows:
        base = next(r for r in rows if r["task"] == row["task"] and r["method"] == "baseline")
        row["time_ratio"] = round(row["seconds"] / base["seconds"], 3)
        row["quality_delta"] = round(row["quality"] - base["quality"], 4)
    if args.markdown:
        lines = ["| task | method | train s | time vs baseline | quality | vs baseline |", "|---|---|---|---|---|---|"]
        for r in rows:
            metric = "acc" if r["task"] == "vision" else "loss"
            lines.append(f"| {r['task']} | {r['method']} | {r['seconds']:.1f} | {r['time_ratio']:.2f}x | "
                         f"{metric} {r['quality']:.4f} | {r['quality_delta']:+.4f} |")
        args.markdown.write_text("\n".join(lines) + "\n")
    fastest = min((r for r in rows if r["method"] not in ("baseline", "noop_model")), key=lambda r: r["time_ratio"],
                  default=None)
    emit({"benchmark": "algorithm_pareto", "ratio": fastest["time_ratio"] if fastest else None,
          "fastest": fastest["method"] if fastest else None, "rows": rows, "epochs": args.epochs, "steps": args.steps,
          "seeds": args.seeds, "machine": machine()})


if __name__ == "__main__":
    main()
