"""optimizer_matrix: the cost of governance with each optimizer a recipe can name.

For every optimizer (``smalti.optimizers.KINDS``) the baby GPT trains on the signed Shakespeare dataset
twice, interleaved step by step in one process (``common.TwinSteps``): governed (routing per class under a
policy denying the histories the embedding and the tragedies the first block, per-class microbatches of
4, and the ledger recording every step) and its twin with neither, on the same batches.

``ratio_<name>``: median governed step time / median twin step time over all steps of ``--runs`` runs.
Governance adds the same work whatever the optimizer (routing, one backward pass per signature, the
ledger's statistics), so what differs between optimizers is how large that work is next to the
optimizer's own step. Informative (the issue sets no goal per optimizer).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import BABY_GPT, emit, governed_shakespeare, interleaved_step_times, machine, write_signed_policy

from smalti.config import Recipe
from smalti.optimizers import KINDS
from smalti.trainer import Trainer
from smalti.trust.keys import write_key_pair

SETTINGS = {"adamw": {"lr": 1e-3}, "sgd": {"lr": 1e-2}, "adafactor": {"lr": 1e-2}, "muon": {"lr": 2e-2},
            "lion": {"lr": 1e-4, "betas": [0.9, 0.99]}, "schedulefree_adamw": {"lr": 3e-3, "betas": [0.9, 0.99]},
            "sophia": {"lr": 1e-3, "betas": [0.965, 0.99], "hessian_every": 10}}
assert set(SETTINGS) == set(KINDS), "every optimizer a recipe can name is measured"


def recipe(governed, steps: int, name: str, policy: Path | None, trainer_key: Path) -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": dict(BABY_GPT),
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": "per_class"},
        "optimizer": {"name": name, **SETTINGS[name]},
        "scheduler": {"warmup": "4ba", "name": "constant" if name == "schedulefree_adamw" else "cosine"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": 12, "microbatch_size": 4, "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 12},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if policy else None,
                       "ledger": {"enabled": policy is not None, "key": str(trainer_key), "entropy_every": 0}},
    })


def measure(governed, root: Path, name: str, policy: Path, trainer_key: Path, steps: int, runs: int) -> dict:
    on, off = [], []
    for run in range(runs):
        twin = Trainer(recipe(governed, steps, name, None, trainer_key), root / f"off-{name}-{run}")
        routed = Trainer(recipe(governed, steps, name, policy, trainer_key), root / f"on-{name}-{run}")
        routed_times, twin_times = interleaved_step_times(routed, twin)
        on += routed_times
        off += twin_times
    return {"ratio": statistics.median(on) / statistics.median(off), "on_ms": 1000 * statistics.median(on),
            "off_ms": 1000 * statistics.median(off)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--optimizers", default=",".join(KINDS), help="comma-separated (default: every one)")
    args = parser.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        parser.error(f"--optimizers: {unknown[0]!r} is not one of {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root)
        write_key_pair("trainer", root / "keys")
        policy = write_signed_policy(governed, root / "policy.yaml", rules=[
            {"classes": ["gutenberg/history"], "params": ["tok_emb"], "action": "deny"},
            {"classes": ["gutenberg/tragedy"], "params": ["blocks.0"], "action": "deny"}])
        results = {name: measure(governed, root, name, policy, root / "keys" / "trainer.key", args.steps, args.runs)
                   for name in names}
    emit({
        "benchmark": "optimizer_matrix",
        **{f"ratio_{name}": round(r["ratio"], 4) for name, r in results.items()},
        "step_ms": {name: {"governed": round(r["on_ms"], 1), "plain": round(r["off_ms"], 1)} for name, r in results.items()},
        "ratio": round(statistics.median(r["ratio"] for r in results.values()), 4),
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
