"""From a recipe to the parts the trainer needs: device, data, model and loggers."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from smalti.config import Recipe
from smalti.data.freshness import FreshnessRule
from smalti.data.lm import LanguageModelData, OrderConfig, corpus_data, dataset_data, mixture_data
from smalti.data.shards import CacheConfig
from smalti.distributed import DistInfo
from smalti.errors import RecipeError
from smalti.trust.keys import PublicKey
from smalti.trust.taxonomy import Taxonomy
from smalti.loggers.console import ConsoleLogger
from smalti.loggers.jsonl import JSONLLogger
from smalti.loggers.logger import LoggerDestination
from smalti.models.adapters import add_class_adapters
from smalti.models.gpt import GPT, GPTConfig
from smalti.models.resnet import ResNet, ResNetConfig


def resolve_device(choice: str, dist: DistInfo) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RecipeError("train.device is 'cuda' but no CUDA device is available")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def build_data(recipe: Recipe, dist: DistInfo) -> LanguageModelData:
    config, train = recipe.data, recipe.train
    if train.global_batch_size % dist.world_size:
        raise RecipeError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by "
            f"the number of processes ({dist.world_size})"
        )
    order = OrderConfig(
        global_batch_size=train.global_batch_size,
        seed=recipe.seed,
        shuffle=config.shuffle,
        batching=recipe.batching,
        class_unit=class_unit(recipe),
        shuffle_block_shards=config.shuffle_block_shards,
        exclude_classes=tuple(config.exclude_classes),
        late_classes=tuple(config.late_classes),
        only_classes=tuple(config.only_classes),
        train_examples=config.train_examples,
    )
    if config.deletable_late and config.taxonomy is None:
        raise RecipeError(
            "data.deletable_late needs a taxonomy that marks classes deletable (data.url, or data.images with "
            "data.taxonomy)"
        )
    if config.images is not None:
        from smalti.data.images import digits_data

        from smalti.data.images import digit_classes

        if config.taxonomy is None or config.trust is None:
            return digits_data(order, config.image_size)
        taxonomy = Taxonomy.load(config.taxonomy, trust=PublicKey.load(config.trust))  # governed digits
        digit_classes(taxonomy, config.taxonomy)  # named in the error, before anything is built
        if config.deletable_late:
            late = tuple(dict.fromkeys(order.late_classes + tuple(sorted(taxonomy.deletable))))
            order = dataclasses.replace(order, late_classes=late)
        return digits_data(order, config.image_size, taxonomy=taxonomy)
    if config.corpus is not None:
        data = corpus_data(config.corpus, recipe.seq_len, order, config.val_fraction, config.class_template)
        data.workers = config.workers
        return data
    assert config.taxonomy is not None and config.trust is not None
    taxonomy = Taxonomy.load(config.taxonomy, trust=PublicKey.load(config.trust))
    if config.deletable_late:  # the classes data governance marked deletable go last in every epoch
        late = tuple(dict.fromkeys(order.late_classes + tuple(sorted(taxonomy.deletable))))
        order = dataclasses.replace(order, late_classes=late)
    options: dict[str, Any] = dict(
        storage_options=config.storage_options,
        cache=CacheConfig(config.cache_dir, config.cache_limit),
        verify=config.verify,
        memory_shards=config.memory_shards,
        workers=config.workers,
    )
    if config.mixture:
        urls, weights = [m.url for m in config.mixture], [m.weight for m in config.mixture]
        rules = [FreshnessRule(m.manifest_root, m.min_version) for m in config.mixture]
        return mixture_data(urls, weights, taxonomy, recipe.seq_len, order, freshness=rules, **options)
    assert config.url is not None
    return dataset_data(
        config.url,
        taxonomy,
        recipe.seq_len,
        order,
        freshness=FreshnessRule(config.manifest_root, config.min_version),
        **options,
    )


def class_unit(recipe: Recipe) -> int | None:
    """per_class batching: how many consecutive examples share a class (must be a multiple of the microbatch)."""
    if recipe.batching != "per_class":
        return None
    unit = recipe.data.class_unit or recipe.train.microbatch_size or recipe.train.global_batch_size
    micro = recipe.train.microbatch_size
    if micro is not None and unit % micro:
        raise RecipeError(f"data.class_unit ({unit}) must be a multiple of train.microbatch_size ({micro})")
    return unit


def build_model(recipe: Recipe, vocab_size: int, class_names: list[str] | None = None) -> torch.nn.Module:
    """The recipe's model, with per-class adapters attached if the recipe asks for them.

    For ``resnet`` the classes are the labels (``vocab_size`` is unused).
    """
    config = recipe.model
    model: torch.nn.Module
    if config.name == "hf":
        from smalti.models.hf import add_lora_adapters, build_hf_model

        model = build_hf_model(config.hf, vocab_size, recipe.seq_len)
        if config.lora.classes:
            add_lora_adapters(model, config.lora, class_names or [])
        return model
    if config.name == "diffusion":
        from smalti.models.diffusion import DiffusionUNet, lora_targets_hint

        model = DiffusionUNet(config.diffusion, recipe.data.image_size, noise_seed=recipe.seed)
        if config.lora.classes:
            from smalti.models.hf import add_lora_adapters

            add_lora_adapters(model, config.lora, class_names or [], inner=model.unet, hint=lora_targets_hint)
        return model
    if config.name == "resnet":
        return ResNet(
            ResNetConfig(
                num_classes=len(class_names or []),
                in_channels=1,
                widths=tuple(config.resnet.widths),
                blocks_per_stage=config.resnet.blocks_per_stage,
                dropout=config.dropout,
            )
        )
    model = GPT(
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
    if config.adapters.classes:
        unknown = [c for c in config.adapters.classes if c not in (class_names or [])]
        if unknown:
            raise RecipeError(f"model.adapters: class '{unknown[0]}' is not in the taxonomy")
        targets = [f"blocks.{i}.mlp" for i in range(config.n_layer)]
        add_class_adapters(
            model,
            targets,
            config.adapters.classes,
            class_names or [],
            config.d_model,
            config.adapters.hidden,
            config.adapters.gated,
        )
    return model


def build_model_for(recipe: Recipe, data: LanguageModelData, surgery: bool = True) -> torch.nn.Module:
    """The recipe's model sized for ``data`` (its vocabulary, or its classes for images).

    ``surgery``: with the recipe's model surgery applied, so a checkpoint of the trained model fits it.
    """
    vocab_size = data.tokenizer.vocab_size if data.tokenizer is not None else 0
    model = build_model(recipe, vocab_size, data.class_names)
    return with_recipe_surgery(model, recipe) if surgery else model


def with_recipe_surgery(model: torch.nn.Module, recipe: Recipe) -> torch.nn.Module:
    """``model`` after the surgery of the recipe's algorithms (``smalti/core/surgery.py``)."""
    from smalti.algorithms import build_algorithms
    from smalti.core.surgery import apply_surgery

    return apply_surgery(model, build_algorithms(recipe.algorithms))


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
        from smalti.loggers.mlflow import MLflowLogger

        destinations.append(MLflowLogger(run_dir))
    if recipe.logging.tensorboard:
        from smalti.loggers.tensorboard import TensorBoardLogger

        destinations.append(TensorBoardLogger(run_dir))
    if recipe.logging.wandb is not None:
        from smalti.loggers.wandb import WandbLogger

        config = recipe.logging.wandb
        destinations.append(
            WandbLogger(run_dir, config.project, config.mode, config.entity, config.name, config.init_timeout)
        )
    return destinations
