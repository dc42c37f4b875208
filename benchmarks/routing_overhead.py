"""routing_overhead: the baby GPT on the signed Shakespeare dataset, with a routing policy vs without.

Two trainers run interleaved step by step in one process (after each step of
the routed trainer, one step of its twin without a policy, on the same
batches), so both see the same machine conditions; each optimizer step is
timed on its own (``common.TwinSteps``), not the loop around it.

- ``ratio``: per-class microbatches (the default under a policy): batches of
  12 in microbatches of 4, each from one class; the policy denies the
  histories the embedding and the tragedies the first block.
- ``ratio_mixed``: random batches of 12 in one microbatch, under a policy
  that gives each of four groups of classes (comedies; histories;
  tragedies; poems and romances) a different allowed set, so a microbatch
  holds up to 4 routing signatures and its rows are split by module.

Each ratio is the median step time with the policy / without, over all
steps of several runs (goals: <= 1.03 and <= 1.25).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import BABY_GPT, emit, governed_shakespeare, interleaved_step_times, machine, write_signed_policy

from smalti.config import Recipe
from smalti.core.callback import Callback
from smalti.trainer import Trainer

GROUPS = {  # four groups of classes, each with its own allowed set
    "gutenberg/history": "tok_emb",
    "gutenberg/tragedy": "blocks.0",
    "gutenberg/poetry": "blocks.3.mlp",
    "gutenberg/romance": "blocks.3.mlp",
}


def write_policy(governed, path: Path, mixed: bool) -> Path:
    if mixed:
        rules = [{"classes": [group], "params": [params], "action": "deny"} for group, params in GROUPS.items()]
    else:
        rules = [{"classes": ["gutenberg/history"], "params": ["tok_emb"], "action": "deny"},
                 {"classes": ["gutenberg/tragedy"], "params": ["blocks.0"], "action": "deny"}]
    return write_signed_policy(governed, path, rules=rules)


def recipe(governed, steps: int, policy: Path | None, batching: str, microbatch: int | None) -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": dict(BABY_GPT),
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": batching},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": 12, "microbatch_size": microbatch,
                  "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 12},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if policy else None},
    })


class SignatureCounter(Callback):
    """Counts the routing signatures of each batch of the routed trainer."""

    def __init__(self) -> None:
        self.signatures: list[int] = []
        self.router = None  # the routed trainer's

    def after_dataloader(self, state, logger) -> None:
        allowed = self.router.phases[0].allowed
        self.signatures.append(len({allowed[c].tobytes() for c in state.batch.provenance[:, 0].tolist()}))


def measure(governed, root: Path, mixed: bool, steps: int, runs: int) -> tuple[float, float]:
    policy = write_policy(governed, root / ("mixed.yaml" if mixed else "per_class.yaml"), mixed)
    batching, microbatch = ("random", None) if mixed else ("per_class", 4)
    routed_times, plain_times, signatures = [], [], []
    for run in range(runs):
        twin = Trainer(recipe(governed, steps, None, batching, microbatch), root / f"plain-{mixed}-{run}")
        counter = SignatureCounter()
        routed = Trainer(recipe(governed, steps, policy, batching, microbatch), root / f"routed-{mixed}-{run}",
                         callbacks=[counter])
        counter.router = routed.router
        measured, twin_times = interleaved_step_times(routed, twin)
        routed_times += measured
        plain_times += twin_times
        signatures += counter.signatures
    return statistics.median(routed_times) / statistics.median(plain_times), statistics.mean(signatures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root)
        ratio, _ = measure(governed, root, mixed=False, steps=args.steps, runs=args.runs)
        ratio_mixed, signatures = measure(governed, root, mixed=True, steps=args.steps, runs=args.runs)
    emit({
        "benchmark": "routing_overhead",
        "ratio": round(ratio, 4),
        "goal": "<= 1.03",
        "ratio_mixed": round(ratio_mixed, 4),
        "goal_mixed": "<= 1.25",
        "routing_signatures_per_mixed_batch": round(signatures, 2),
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
