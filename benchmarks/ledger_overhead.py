"""Ledger overhead: the baby GPT on Shakespeare with the ledger on vs off, in the same run.

Two trainers on the same batches (per-class microbatches of 4 in batches of
12, the default under a policy); after each step of the recorded trainer, one
step of its twin without a ledger, each timed on its own, so both see the
same machine conditions. The recorded trainer writes every step's entry,
an entropy profile every 50 steps and commits every 50 steps; ``ratio`` is
total time with / without over all steps after warm-up (a mean, so the
periodic entropy and commit costs count), median over runs. Goal <= 1.03.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import BABY_GPT, emit, governed_shakespeare, machine

from tessera.config import Recipe
from tessera.core.callback import Callback
from tessera.governance.keys import write_key_pair
from tessera.trainer import Trainer


def recipe(governed, steps: int, key: Path | None) -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": dict(BABY_GPT),
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": "per_class"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": 12, "microbatch_size": 4, "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 12},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"ledger": {"enabled": key is not None, "key": str(key) if key else None,
                                  "entropy_every": 50, "flush_every": 50}},
    })


class PairedTrainers(Callback):
    def __init__(self, twin: Trainer) -> None:
        self.twin = twin
        self.batches = twin.data.train_batches(0, 0)
        self.recorded: list[float] = []
        self.plain: list[float] = []
        self._last = 0.0

    def fit_start(self, state, logger) -> None:
        self._last = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        self.recorded.append(time.perf_counter() - self._last)
        started = time.perf_counter()
        self.twin._train_batch(next(self.batches))
        self.plain.append(time.perf_counter() - started)
        self._last = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    ratios, entry_bytes = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root)
        key, _ = write_key_pair("trainer", root / "trainer-key")
        for run in range(args.runs):
            twin = Trainer(recipe(governed, args.steps, None), root / f"plain-{run}")
            pairs = PairedTrainers(twin)
            recorded = Trainer(recipe(governed, args.steps, key), root / f"ledger-{run}", callbacks=[pairs])
            recorded.fit()
            recorded.close()
            twin.close()
            ratios.append(sum(pairs.recorded[5:]) / sum(pairs.plain[5:]))
            entry_bytes = (root / f"ledger-{run}" / "ledger.sqlite").stat().st_size // (args.steps + 1)
    emit({
        "benchmark": "ledger_overhead",
        "ratio": round(statistics.median(ratios), 4),
        "goal": "<= 1.03",
        "ratios": [round(r, 4) for r in ratios],
        "ledger_bytes_per_step": entry_bytes,
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
