"""From a recipe to the parts the trainer needs: device, data, model and loggers."""

from __future__ import annotations

from pathlib import Path

import torch

from tessera.config import Recipe
from tessera.data.lm import CorpusData, CorpusDataConfig
from tessera.distributed import DistInfo
from tessera.errors import RecipeError
from tessera.loggers.console import ConsoleLogger
from tessera.loggers.jsonl import JSONLLogger
from tessera.loggers.logger import LoggerDestination
from tessera.models.gpt import GPT, GPTConfig


def resolve_device(choice: str, dist: DistInfo) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is 'cuda' but no CUDA device is available")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def build_data(recipe: Recipe, dist: DistInfo) -> CorpusData:
    if recipe.train.global_batch_size % dist.world_size:
        raise RecipeError(
            f"train.global_batch_size ({recipe.train.global_batch_size}) must be divisible by "
            f"the number of processes ({dist.world_size})"
        )
    return CorpusData(
        CorpusDataConfig(
            corpus=recipe.data.corpus,
            seq_len=recipe.seq_len,
            global_batch_size=recipe.train.global_batch_size,
            val_fraction=recipe.data.val_fraction,
            shuffle=recipe.data.shuffle,
            seed=recipe.seed,
        )
    )


def build_model(recipe: Recipe, vocab_size: int) -> GPT:
    config = recipe.model
    return GPT(
        GPTConfig(
            vocab_size=vocab_size,
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            d_model=config.d_model,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
            bias=config.bias,
            alibi=config.alibi,
        )
    )


def build_logger_destinations(recipe: Recipe, run_dir: Path, dist: DistInfo) -> list[LoggerDestination]:
    """Only the main rank writes logs; the others get none (and so never sync to log)."""
    if not dist.is_main:
        return []
    destinations: list[LoggerDestination] = []
    if recipe.logging.console:
        destinations.append(ConsoleLogger(mode=recipe.logging.progress))
    if recipe.logging.jsonl:
        destinations.append(JSONLLogger(run_dir / "metrics.jsonl"))
    if recipe.logging.mlflow:
        from tessera.loggers.mlflow import MLflowLogger

        destinations.append(MLflowLogger(run_dir))
    return destinations
