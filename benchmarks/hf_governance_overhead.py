"""hf_governance_overhead: governance on a Hugging Face model, on versus off.

A Llama-architecture config of about 2.6M parameters (``common.HF_LLAMA``), sequence length 256,
32 rows a step (8,192 tokens), on the BPE-tokenized, signed Shakespeare dataset, on the CPU. As in
``routing_overhead``, the governed trainer and its twin without governance run interleaved step by
step in one process (``common.TwinSteps``), each optimizer step timed on its own.

- ``ratio``: routing per class plus the ledger. Per-class microbatches of 8; the policy denies the
  histories the input embedding and the tragedies the first decoder layer; the ledger records every
  step (per-layer, per-class contributions, Merkle tree, signed heads at checkpoints). The twin has
  the same batches and no policy or ledger. Goal: <= 1.05.
- ``ratio_lora_mixed``: four classes each with its own LoRA adapter (peft, on q_proj and v_proj),
  random batches of 32 in one microbatch (up to five routing signatures in it), a policy confining
  each of the four to its adapter, and the ledger; the twin has the same four adapters, gated per
  row the same way, and no policy or ledger.

Each ratio is the median step time governed / ungoverned over all steps of several runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import HF_LLAMA, emit, governed_shakespeare, machine, twin_runs, write_signed_policy

from smalti.config import Recipe
from smalti.trust.keys import write_key_pair
from smalti.trainer import Trainer

SEQ_LEN, BATCH = 256, 32
ADAPTED = ["gutenberg/tragedy/hamlet", "gutenberg/tragedy/macbeth", "gutenberg/comedy/twelfth_night",
           "gutenberg/history/henry_v"]


def write_policy(governed, path: Path, lora: bool) -> Path:
    if lora:
        return write_signed_policy(governed, path, exclusive=[{"classes": [c], "params": ["@adapter"]} for c in ADAPTED])
    return write_signed_policy(governed, path, rules=[
        {"classes": ["gutenberg/history"], "params": ["model.embed_tokens"], "action": "deny"},
        {"classes": ["gutenberg/tragedy"], "params": ["model.layers.0"], "action": "deny"}])


def recipe(governed, steps: int, governed_run: bool, lora: bool, policy: Path, trainer_key: Path,
           batch: int = BATCH) -> Recipe:
    model = {"hf": {"config": dict(HF_LLAMA)}}
    if lora:
        model["lora"] = {"classes": ADAPTED, "r": 8, "freeze_base": False}
    return Recipe.model_validate({
        "seed": 1,
        "model": model,
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "seq_len": SEQ_LEN, "batching": "random" if lora else "per_class"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "4ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": batch, "microbatch_size": batch if lora else min(8, batch),
                  "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 8},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if governed_run else None,
                       "ledger": {"enabled": governed_run, "key": str(trainer_key), "entropy_every": 0}},
    })


def measure(governed, root: Path, lora: bool, steps: int, runs: int, trainer_key: Path, batch: int) -> float:
    policy = write_policy(governed, root / f"policy-{lora}.yaml", lora)
    on, off = twin_runs(lambda run: (
        Trainer(recipe(governed, steps, True, lora, policy, trainer_key, batch), root / f"on-{lora}-{run}"),
        Trainer(recipe(governed, steps, False, lora, policy, trainer_key, batch), root / f"off-{lora}-{run}")), runs)
    return statistics.median(on) / statistics.median(off)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"rows of {SEQ_LEN} tokens a step (default {BATCH}; the tests' smoke run uses fewer)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root, seq_len=SEQ_LEN, bpe_vocab=2048)
        write_key_pair("trainer", root / "keys")
        trainer_key = root / "keys" / "trainer.key"
        ratio = measure(governed, root, False, args.steps, args.runs, trainer_key, args.batch)
        ratio_lora = measure(governed, root, True, args.steps, args.runs, trainer_key, args.batch)
    emit({
        "benchmark": "hf_governance_overhead",
        "ratio": round(ratio, 4),
        "goal": "<= 1.05",
        "ratio_lora_mixed": round(ratio_lora, 4),
        "lora_adapters": len(ADAPTED),
        "model": dict(HF_LLAMA),
        "tokens_per_step": SEQ_LEN * args.batch,
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
