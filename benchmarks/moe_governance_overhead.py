"""moe_governance_overhead: governance on a mixture-of-experts model, on versus off.

A Mixtral-architecture config of about 4M parameters (``MIXTRAL``: 4 layers, width 128, 8 experts of
width 256, top 2, the load-balancing loss on), sequence length 256, 32 rows a step (8,192 tokens), on the
BPE-tokenized, signed Shakespeare dataset, on the CPU. The governed trainer and its twin without governance
run interleaved step by step in one process (``common.TwinSteps``), each optimizer step timed on its own.

- ``ratio``: routing per class plus the ledger. Per-class microbatches of 8; the policy denies the
  histories expert 0 of every layer and the tragedies the gates; the ledger records every step, with the
  tokens each expert received per class. The twin has the same batches and no policy or ledger.
  Goal: <= 1.10.

The ratio is the median step time governed / ungoverned over all steps of several runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import emit, governed_shakespeare, machine, twin_runs, write_signed_policy

from smalti.config import Recipe
from smalti.trust.keys import write_key_pair
from smalti.trainer import Trainer

SEQ_LEN, BATCH = 256, 32
MIXTRAL = {"model_type": "mixtral", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": SEQ_LEN,
           "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": True,
           "router_aux_loss_coef": 0.02}


def recipe(governed, steps: int, governed_run: bool, policy: Path, trainer_key: Path, batch: int) -> Recipe:
    return Recipe.model_validate({
        "seed": 1,
        "model": {"hf": {"config": dict(MIXTRAL)}},
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "seq_len": SEQ_LEN, "batching": "per_class"},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "4ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": batch, "microbatch_size": min(8, batch),
                  "grad_clip_norm": 1.0},
        "eval": {"interval": "1000000ba", "max_samples": 8},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if governed_run else None,
                       "ledger": {"enabled": governed_run, "key": str(trainer_key), "entropy_every": 0}},
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
        policy = write_signed_policy(governed, root / "policy.yaml", rules=[
            {"classes": ["gutenberg/history"], "params": ["model.layers.*.mlp.experts.0"], "action": "deny"},
            {"classes": ["gutenberg/tragedy"], "params": ["model.layers.*.mlp.gate"], "action": "deny"}])
        built: list[Trainer] = []

        def pair(run: int) -> tuple[Trainer, Trainer]:
            built.append(Trainer(recipe(governed, args.steps, True, policy, trainer_key, args.batch), root / f"on-{run}"))
            return built[-1], Trainer(recipe(governed, args.steps, False, policy, trainer_key, args.batch), root / f"off-{run}")

        on, off = twin_runs(pair, args.runs)
        parameters = sum(p.numel() for p in built[0].model.parameters())
    emit({
        "benchmark": "moe_governance_overhead",
        "ratio": round(statistics.median(on) / statistics.median(off), 4),
        "goal": "<= 1.10",
        "step_ms": {"governed": round(1000 * statistics.median(on), 1), "ungoverned": round(1000 * statistics.median(off), 1)},
        "parameters": parameters,
        "model": dict(MIXTRAL),
        "tokens_per_step": SEQ_LEN * args.batch,
        "steps": args.steps,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
