"""Every algorithm in the library: it trains, it changes what it says it changes, and a run with it
crashed and resumed equals the uninterrupted run bitwise."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from smalti.algorithms import REGISTRY
from smalti.trainer import Trainer

from conftest import tiny_recipe
from helpers import assert_tree_equal, crash_and_resume, eval_losses, latest_payload, losses, recipe

pytest.importorskip("sklearn")  # the image task's data ships inside scikit-learn


def digits_recipe(**sections: dict[str, Any]) -> dict[str, Any]:
    """A 2-stage, 8/16-wide ResNet on the 16x16 digits: 12 steps of 32 images."""
    config: dict[str, Any] = {
        "seed": 5,
        "model": {"name": "resnet", "dropout": 0.2, "resnet": {"widths": [8, 16], "blocks_per_stage": 1}},
        "data": {"images": "digits", "image_size": 16},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "train": {"max_duration": "12ba", "global_batch_size": 32, "microbatch_size": 16, "deterministic": True},
        "eval": {"interval": "6ba", "max_samples": 64, "batch_size": 64},
        "checkpoint": {"interval": "4ba", "keep": 2},
        "logging": {"console": False},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values} if isinstance(values, dict) else values
    return config


# name -> (task, options, effect): the run must differ from the same recipe without the method ("differs"),
# except for methods that by design leave a CPU fp32 run unchanged ("same"), or unchanged up to float
# rounding ("close": another memory layout takes other kernels).
CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "alibi": ("text", {}, "differs"),
    "augmix": ("images", {"severity": 3, "width": 2}, "differs"),
    "blurpool": ("images", {"min_channels": 1}, "differs"),
    "channels_last": ("images", {}, "close"),
    "colout": ("images", {"p_row": 0.25, "p_col": 0.25}, "differs"),
    "cutmix": ("images", {"alpha": 1.0}, "differs"),
    "cutout": ("images", {"length": 0.5}, "differs"),
    "ema": ("text", {"half_life": "4ba"}, "differs"),
    "factorize": ("images", {"min_channels": 8, "min_features": 8, "latent_channels": 0.25}, "differs"),
    "gated_linear_units": ("text", {}, "differs"),
    "ghost_batchnorm": ("images", {"ghost_batch_size": 4}, "differs"),
    "gradient_clipping": ("images", {"clipping_type": "adaptive", "clipping_threshold": 0.01}, "differs"),
    "gyro_dropout": ("images", {"sigma": 8, "tau": 2, "rotate_every": 3}, "differs"),
    "label_smoothing": ("text", {"smoothing": 0.1}, "differs"),
    "layer_freezing": ("text", {"freeze_start": 0.3, "freeze_level": 0.6}, "differs"),
    "low_precision_groupnorm": ("images", {}, "same"),
    "low_precision_layernorm": ("text", {}, "same"),
    "mixup": ("images", {"alpha": 0.4}, "differs"),
    "noop_model": ("images", {}, "differs"),
    "progressive_resizing": ("images", {"initial_scale": 0.5, "delay_fraction": 0.2, "finetune_fraction": 0.3}, "differs"),
    "randaugment": ("images", {"depth": 2, "severity": 9}, "differs"),
    "sam": ("images", {"rho": 0.05, "interval": 2}, "differs"),
    "selective_backprop": ("images", {"start": 0.2, "end": 0.9, "keep": 0.5, "interrupt": 3}, "differs"),
    "sequence_length_warmup": ("text", {"duration": "0.5dur", "min_seq_length": 4, "step_size": 4}, "differs"),
    "squeeze_excite": ("images", {"min_channels": 8, "latent_channels": 4}, "differs"),
    "stochastic_depth": ("images", {"drop_rate": 0.3, "mode": "sample"}, "differs"),
    "swa": ("images", {"swa_start": "0.3dur", "swa_end": "0.8dur", "update_interval": "2ba"}, "differs"),
    "weight_standardization": ("images", {}, "differs"),
}


def test_every_algorithm_has_a_case():
    assert set(CASES) == set(REGISTRY), set(CASES) ^ set(REGISTRY)


def config_for(task: str, algorithms: dict[str, Any], corpus: Path) -> dict[str, Any]:
    if task == "images":
        return digits_recipe(algorithms=algorithms)
    return tiny_recipe(corpus, algorithms=algorithms, model={"dropout": 0.1},
                       train={"max_duration": "12ba", "microbatch_size": 4}, checkpoint={"interval": "4ba"},
                       eval={"interval": "6ba"})


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, tiny_corpus) -> dict[str, list[tuple[int, float]]]:
    """Train and eval losses of each task without any algorithm."""
    found = {}
    for task in ("images", "text"):
        run = tmp_path_factory.mktemp(f"baseline-{task}")
        Trainer(recipe(config_for(task, {}, tiny_corpus)), run).fit()
        found[task] = losses(run) + eval_losses(run)
    return found


@pytest.mark.parametrize("name", sorted(CASES))
def test_algorithm_trains_acts_and_resumes_bitwise(name, tmp_path, tiny_corpus, baselines):
    task, options, effect = CASES[name]
    config = config_for(task, {name: options}, tiny_corpus)
    reference_dir, resumed_dir, resumed_from = crash_and_resume(tmp_path, config, crash_at=6)
    assert resumed_from == 4

    a, b = latest_payload(reference_dir), latest_payload(resumed_dir)
    for key in ("model", "optimizer", "algorithms", "timestamp", "rng", "eval_metrics", "eval_by_class", "surgery"):
        assert_tree_equal(a[key], b[key], key)
    assert losses(reference_dir) == losses(resumed_dir)
    assert eval_losses(reference_dir) == eval_losses(resumed_dir)
    assert len(losses(reference_dir)) == 12
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss in losses(reference_dir))
    trajectory = losses(reference_dir) + eval_losses(reference_dir)  # EMA changes only the evaluated weights
    if effect == "differs":
        assert trajectory != baselines[task], f"{name} did not change training"
    elif effect == "same":
        assert trajectory == baselines[task], f"{name} should leave a CPU fp32 run unchanged"
    else:
        assert [loss for _, loss in trajectory] == pytest.approx([loss for _, loss in baselines[task]], rel=2e-3), f"{name} changed the math"


def shipped_stacks() -> dict[str, dict[str, Any]]:
    import yaml

    from conftest import REPO

    found = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        algorithms = (yaml.safe_load(path.read_text()) or {}).get("algorithms") or {}
        if algorithms:
            found[path.stem] = algorithms
    return found


def stack_pairs() -> list[tuple[str, str, str]]:
    import itertools

    return [(stack, a, b) for stack, algorithms in shipped_stacks().items()
            for a, b in itertools.combinations(sorted(algorithms), 2)]


def test_the_shipped_recipes_hold_stacks():
    assert {"digits-mild", "digits-medium", "digits-hot", "shakespeare-speed"} <= set(shipped_stacks())


@pytest.mark.parametrize("stack, first, second", stack_pairs())
def test_every_pair_in_a_shipped_stack_trains_together(stack, first, second, tmp_path, tiny_corpus):
    options = shipped_stacks()[stack]
    task = "text" if stack.startswith("shakespeare") else "images"
    config = config_for(task, {first: options[first], second: options[second]}, tiny_corpus)
    config["train"]["max_duration"] = "6ba"
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        result = trainer.fit()
    assert result.timestamp.batch == 6 and torch.isfinite(torch.tensor(result.train_loss))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits-hot", "shakespeare-speed"])
def test_a_shipped_stack_trains_from_the_command_line(name, tmp_path):
    from conftest import REPO, smalti_cli

    done = smalti_cli("train", str(REPO / "recipes" / f"{name}.yaml"), "--set", "train.max_duration=4ba",
                       "--set", "eval.max_samples=64", "--set", "logging.progress=lines", "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    recorded = json.loads((tmp_path / "run" / "algorithms.json").read_text())
    import yaml

    listed = yaml.safe_load((REPO / "recipes" / f"{name}.yaml").read_text())["algorithms"]
    assert len(recorded["algorithms"]) == len(listed)
