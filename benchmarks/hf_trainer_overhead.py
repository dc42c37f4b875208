"""hf_trainer_overhead: Smalti's Trainer vs a hand-written PyTorch loop over the same Hugging Face model.

A Llama-architecture config of about 2.6M parameters (``common.HF_LLAMA``), sequence length 256,
32 rows a step (8,192 tokens), on the BPE-tokenized Shakespeare dataset. The hand-written loop
builds the model straight from transformers (``AutoModelForCausalLM.from_config``), calls it and
computes the loss itself; Smalti trains it through ``model.hf`` as a user's recipe would. As in
``trainer_overhead``, the two loops run interleaved step by step in one process and each step is
timed on its own.

Reports ``ratio`` = median Smalti step time / median hand-written step time (goal <= 1.01) and
``same_losses_bitwise``: whether both loops' per-step losses are the same floats (the same model,
initialisation, batches, schedule, clipping and optimizer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from common import HF_LLAMA, HandwrittenHFLoop, PairedSteps, emit, governed_shakespeare, machine

from smalti.build import build_data
from smalti.config import Recipe
from smalti.distributed import DistInfo
from smalti.trainer import Trainer

SEQ_LEN, BATCH = 256, 32


def recipe(governed, steps: int, batch: int = BATCH) -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": {"hf": {"config": dict(HF_LLAMA)}},
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "seq_len": SEQ_LEN},
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.99]},
        "scheduler": {"name": "cosine", "warmup": "4ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": batch, "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 8},  # the final evaluation only; never timed
        "checkpoint": {"interval": "1000000ba", "keep": 1},
        "logging": {"console": False, "jsonl": True},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"rows of {SEQ_LEN} tokens a step (default {BATCH}; the tests' smoke run uses fewer)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root, seq_len=SEQ_LEN, bpe_vocab=2048)
        config = recipe(governed, args.steps, args.batch)
        data = build_data(config, DistInfo())
        smalti, hand, per_run, same = [], [], [], True
        for run in range(args.runs):
            loop = HandwrittenHFLoop(config, data, args.steps)
            losses = []
            original = loop.step

            def step_and_record():
                seconds, loss = original()
                losses.append(loss)
                return seconds, loss

            loop.step = step_and_record
            pairs = PairedSteps(loop)
            run_dir = root / f"run-{run}"
            Trainer(config, run_dir, data=data, callbacks=[pairs]).fit()
            trained = [json.loads(line)["train/loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                       if "train/loss" in line]
            same = same and len(losses) == args.steps and trained == losses
            skip = 2  # allocator warm-up
            smalti += pairs.smalti[skip:]
            hand += pairs.handwritten[skip:]
            per_run.append(statistics.median(pairs.smalti[skip:]) / statistics.median(pairs.handwritten[skip:]))
        data.train.close(), data.val.close()
    median = statistics.median
    emit({
        "benchmark": "hf_trainer_overhead",
        "ratio": round(median(smalti) / median(hand), 4),
        "goal": "<= 1.01",
        "same_losses_bitwise": same,
        "model": {k: v for k, v in HF_LLAMA.items()},
        "tokens_per_step": SEQ_LEN * args.batch,
        "steps": args.steps,
        "runs": args.runs,
        "smalti_step_ms_median": round(1000 * median(smalti), 2),
        "handwritten_step_ms_median": round(1000 * median(hand), 2),
        "per_run_ratios": [round(r, 4) for r in per_run],
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
