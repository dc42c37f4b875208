"""Ledger overhead: the baby GPT on Shakespeare with the ledger on vs off, in the same run.

Two trainers on the same batches (per-class microbatches of 4 in batches of
12, the default under a policy); after each step of the recorded trainer, one
step of its twin without a ledger, each timed on its own, so both see the
same machine conditions (``common.TwinSteps``: the optimizer step is timed,
everything the ledger does in it included; the loop around it, the same code
in both, is not). The recorded trainer writes every step's entry,
an entropy profile every 50 steps and commits every 50 steps; ``ratio`` is
total time with / without over all steps after warm-up (a mean, so the
periodic entropy and commit costs count), median over runs. Goal <= 1.03.

The ledger's cost is per step and per parameter, training's per token, so
``ratio_large_batch`` repeats the measurement at a larger global batch (same
three microbatches and signatures, four times the tokens each).

``--device cuda`` measures on a GPU (``auto``, the default, takes one where
there is one); each timed step then ends with a device synchronisation, so
work queued by one trainer is never billed to the other. On a GPU the baby
GPT's step is a few milliseconds of kernel launches, so ``--n-layer``,
``--d-model``, ``--n-head``, ``--block-size`` and ``--precision`` also measure a
model whose step the GPU's arithmetic, not Python, dominates.

``--parts`` also measures what each part of the ledger's work costs, at
batch 12, by stripping the recorded trainer's ledger down (in this script
only) to: ``routing``, the per-signature microbatches and routed backward
the ledger needs and nothing else; ``statistics_no_entropy``, the recorder's
per-step measurements (signature rows, Gram matrices, update statistics)
with nothing written; ``statistics``, the same plus the entropy probe. The
full ledger adds entries, hashing and commits to that.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import BABY_GPT, TwinSteps, emit, governed_shakespeare, machine

from smalti.config import Recipe
from smalti.trust.keys import write_key_pair
from smalti.governance.routing import routed_backward
from smalti.trainer import Trainer


def recipe(governed, steps: int, key: Path | None, batch: int = 12, device: str = "auto",
           model: dict | None = None, precision: str = "fp32") -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": dict(model or BABY_GPT),
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": "per_class"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": batch, "microbatch_size": batch // 3,
                  "grad_clip_norm": 1.0, "device": device, "precision": precision},
        "eval": {"interval": "1000000ba", "max_samples": 12},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"ledger": {"enabled": key is not None, "key": str(key) if key else None,
                                  "entropy_every": 50, "flush_every": 50}},
    })


PARTS = ("routing", "statistics_no_entropy", "statistics")


def strip(ledger, part: str) -> None:
    """Reduce one trainer's ledger to a part of its work (see ``--parts``), on this instance only."""
    recorder = ledger.recorder
    if part == "routing":
        ledger.start_step = lambda loaded, trained: None
        ledger.backward = lambda loss, plan, microbatch: routed_backward(loss, plan)
        ledger.gradient_statistics = lambda inv_scale=1.0: None
        ledger.after_optimizer_step = lambda *args, **kwargs: None
        return
    ledger.start_step = lambda loaded, trained: recorder.start_step()

    def after_optimizer_step(step, *args, **kwargs):
        recorder.update_statistics()
        ledger._gradient = None
        if part == "statistics" and ledger.entropy is not None and step % ledger.entropy_every == 0:
            ledger.entropy.measure()

    ledger.after_optimizer_step = after_optimizer_step


def measure(governed, root: Path, key: Path, steps: int, batch: int, run: int,
            args: argparse.Namespace, part: str | None = None) -> tuple[float, int, str]:
    model = {"n_layer": args.n_layer, "n_head": args.n_head, "d_model": args.d_model, "block_size": args.block_size}
    twin = Trainer(recipe(governed, steps, None, batch, args.device, model, args.precision),
                   root / f"plain-{batch}-{run}-{part or 'all'}")
    recorded = Trainer(recipe(governed, steps, key, batch, args.device, model, args.precision),
                       root / f"ledger-{batch}-{run}-{part or 'all'}")
    if part is not None:
        strip(recorded.ledger, part)
    pairs = TwinSteps(recorded, twin)
    recorded.fit()
    recorded.close()
    twin.close()
    entry_bytes = (root / f"ledger-{batch}-{run}-{part or 'all'}" / "ledger.sqlite").stat().st_size // (steps + 1)
    return sum(pairs.measured[5:]) / sum(pairs.twin[5:]), entry_bytes, twin.device.type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--large-batch", type=int, default=48,
                        help="also measure at this global batch (same 3 microbatches, more tokens each); 0: skip")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where both trainers run (auto: a GPU if there is one)")
    parser.add_argument("--parts", action="store_true",
                        help=f"also measure parts of the ledger's work at batch 12: {', '.join(PARTS)}")
    parser.add_argument("--precision", choices=["fp32", "amp_bf16", "amp_fp16"], default="fp32")
    for name, default in BABY_GPT.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default,
                            help=f"model size (default: the baby GPT's {default})")
    args = parser.parse_args()
    if args.steps <= 5:
        parser.error(f"--steps {args.steps}: the first 5 steps are warm-up, measure more than that")
    ratios, large, entry_bytes, device = [], [], 0, "cpu"
    parts: dict[str, list[float]] = {part: [] for part in PARTS} if args.parts else {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root, seq_len=args.block_size)
        key, _ = write_key_pair("trainer", root / "trainer-key")
        for run in range(args.runs):
            ratio, entry_bytes, device = measure(governed, root, key, args.steps, 12, run, args)
            ratios.append(ratio)
            if args.large_batch:
                large.append(measure(governed, root, key, args.steps, args.large_batch, run, args)[0])
            for part, measured in parts.items():
                measured.append(measure(governed, root, key, args.steps, 12, run, args, part)[0])
    result = {
        "benchmark": "ledger_overhead",
        "ratio": round(statistics.median(ratios), 4),
        "goal": "<= 1.03",
        "ratios": [round(r, 4) for r in ratios],
        "ledger_bytes_per_step": entry_bytes,
        "steps": args.steps,
        "runs": args.runs,
        "device": device,
        "precision": args.precision,
        "model": {name: getattr(args, name) for name in BABY_GPT},
        "machine": machine(),
    }
    if large:
        result.update({"large_batch": args.large_batch, "ratio_large_batch": round(statistics.median(large), 4),
                       "ratios_large_batch": [round(r, 4) for r in large]})
    if parts:
        result["parts"] = {part: round(statistics.median(measured), 4) for part, measured in parts.items()}
        result["parts_ratios"] = {part: [round(r, 4) for r in measured] for part, measured in parts.items()}
    emit(result)


if __name__ == "__main__":
    main()
