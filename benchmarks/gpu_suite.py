"""gpu_suite: the GPU figures in one prepared command (a GPU, where one is lent, is lent briefly).

In one process, on the governed BPE Shakespeare dataset:

- ``dense``: a ~125M-parameter Llama config (12 layers, 768 wide) in bf16 autocast, governance off, then routing
  per class plus the ledger on (a policy denying one genre the input embedding): tokens/s, MFU, the ratio;
- ``fsdp``: the same model under FSDP2 on one GPU (a process group of one), bf16 parameters with governance
  off, then fp32 parameters with bf16 autocast and the ledger on (bf16 parameters cannot be routed);
- ``ledger``: ``ledger_overhead`` at the demo's size (``recipes/shakespeare.yaml``'s GPT): ledger on / off;
- ``checkpoint``: the 125M model's sharded checkpoint under FSDP2, written synchronously and then in the
  background (``checkpoint.async_save``): the seconds training is blocked by each save, median of the saves.

MFU = 6 x parameters x tokens/s / the GPU's dense bf16 peak (named in ``PEAK_BF16``; null where unknown).
On a machine without CUDA it runs ``--size tiny`` (a 2-layer model, a few steps): the same code, so
``tests/test_benchmarks.py`` keeps it working in CI. Prints one JSON line. Goal: under 8 minutes on one H100.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from common import REPO, emit, governed_shakespeare, machine, write_signed_policy

from smalti.config import Recipe
from smalti.trainer import Trainer
from smalti.trust.keys import write_key_pair

LLAMA_125M = dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=1024,
                  tie_word_embeddings=False)
LLAMA_TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
SIZES: dict[str, dict[str, Any]] = {
    "125m": {"model": LLAMA_125M, "seq_len": 1024, "batch": 16, "steps": 24, "vocab": 8192, "demo_steps": 60},
    "tiny": {"model": LLAMA_TINY, "seq_len": 64, "batch": 8, "steps": 4, "vocab": 512, "demo_steps": 4},
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def step_times(trainer: Trainer) -> list[float]:
    """Every optimizer step's seconds, synchronised with the device (wraps this trainer's step)."""
    times: list[float] = []
    step = trainer._train_batch
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)

    def timed(batch):
        sync()
        started = time.perf_counter()
        result = step(batch)
        sync()
        times.append(time.perf_counter() - started)
        return result

    trainer._train_batch = timed  # type: ignore[method-assign]
    return times


def save_times(trainer: Trainer) -> list[float]:
    """Seconds each checkpoint save blocks training."""
    times: list[float] = []
    save = trainer.save_checkpoint

    def timed(event, keep_always: bool = False):
        started = time.perf_counter()
        save(event, keep_always)
        times.append(time.perf_counter() - started)

    trainer.save_checkpoint = timed  # type: ignore[method-assign]
    return times


def recipe(governed, size: dict[str, Any], *, model: dict[str, Any], governed_run: bool, fsdp: bool = False,
           bf16_params: bool = False, policy: Path | None = None, key: Path | None = None,
           checkpoint_every: int | None = None, async_save: bool = False, steps: int | None = None,
           per_class: bool = True, seq_len: int | None = None) -> Recipe:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return Recipe.model_validate({
        "seed": 1,
        "model": model,
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "seq_len": seq_len or size["seq_len"], "batching": "per_class" if per_class else "random"},
        "optimizer": {"name": "adamw", "lr": 3e-4},
        "scheduler": {"warmup": "2ba"},
        "train": {"max_duration": f"{steps or size['steps']}ba", "global_batch_size": size["batch"],
                  "microbatch_size": size["batch"] // 2, "precision": "amp_bf16", "device": device,
                  "parallelism": "fsdp" if fsdp else "ddp",
                  "fsdp": {"param_dtype": "bf16" if bf16_params else "fp32"}},
        "eval": {"interval": "1000000ba", "max_samples": 8},
        "checkpoint": {"interval": f"{checkpoint_every or 1000000}ba", "keep": 2, "async_save": async_save},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if governed_run and policy else None,
                       "ledger": {"enabled": governed_run, "key": str(key), "entropy_every": 0}},
    })


def median_after_warmup(times: list[float]) -> float:
    return statistics.median(times[2:] if len(times) > 3 else times)


def train_case(config: Recipe, run_dir: Path) -> tuple[float, int, int]:
    """(median step seconds, tokens per step, parameters)"""
    with Trainer(config, run_dir) as trainer:
        times = step_times(trainer)
        parameters = sum(p.numel() for p in trainer.model.parameters())
        trainer.fit()
    return median_after_warmup(times), config.train.global_batch_size * (config.data.seq_len or 0), parameters


def throughput(seconds: float, tokens: int, parameters: int) -> dict[str, Any]:
    peak = peak_flops()
    tokens_per_s = tokens / seconds
    return {"step_ms": round(seconds * 1000, 2), "tokens_per_s": round(tokens_per_s),
            "mfu": round(6 * parameters * tokens_per_s / peak, 4) if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="125m" if torch.cuda.is_available() else "tiny")
    args = parser.parse_args()
    size = SIZES[args.size]
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root, seq_len=size["seq_len"], bpe_vocab=size["vocab"])
        write_key_pair("trainer", root / "keys")
        key = root / "keys" / "trainer.key"
        policy = write_signed_policy(governed, root / "policy.yaml", rules=[
            {"classes": ["gutenberg/history"], "params": ["model.embed_tokens"], "action": "deny"}])
        model = {"hf": {"config": dict(size["model"])}}
        shared = dict(model=model, policy=policy, key=key)
        for name, fsdp in (("dense", False), ("fsdp", True)):
            off, tokens, parameters = train_case(
                recipe(governed, size, governed_run=False, fsdp=fsdp, bf16_params=fsdp, **shared), root / f"{name}-off")
            on, _, _ = train_case(recipe(governed, size, governed_run=True, fsdp=fsdp, **shared), root / f"{name}-on")
            results[name] = {"off": throughput(off, tokens, parameters), "governed": throughput(on, tokens, parameters),
                             "ratio": round(on / off, 4)}
        results["parameters"] = parameters
        demo = yaml.safe_load((REPO / "recipes" / "shakespeare.yaml").read_text())["model"]  # the demo's GPT
        ledger_times = []
        for governed_run in (False, True):
            config = recipe(governed, size, model=demo, governed_run=governed_run, key=key, policy=None,
                            steps=size["demo_steps"], per_class=False, seq_len=demo["block_size"])
            ledger_times.append(train_case(config, root / f"ledger-{governed_run}")[0])
        results["ledger"] = {"off_ms": round(ledger_times[0] * 1000, 2), "on_ms": round(ledger_times[1] * 1000, 2),
                             "ratio": round(ledger_times[1] / ledger_times[0], 4)}
        saves = {}
        for mode, async_save in (("sync", False), ("async", True)):
            config = recipe(governed, size, governed_run=False, fsdp=True, checkpoint_every=2, async_save=async_save,
                            steps=6, **shared)
            with Trainer(config, root / f"checkpoint-{mode}") as trainer:
                times = save_times(trainer)
                trainer.fit()
            saves[mode] = round(statistics.median(times), 3)
        results["checkpoint_save_s"] = saves
    emit({
        "benchmark": "gpu_suite",
        "size": args.size,
        "ratio": results["dense"]["ratio"],
        **results,
        "seconds": round(time.perf_counter() - started, 1),
        "goal": "under 480 s on one H100",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
