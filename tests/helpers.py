"""Helpers shared by tests that train (kept out of conftest so they can be imported by name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from smalti.checkpoint import CheckpointStore, load_checkpoint
from smalti.config import Recipe
from smalti.core.callback import Callback
from smalti.loggers.jsonl import read_metrics


class CrashAt(Callback):
    """Raises at the end of a given batch, like a process dying between two steps."""

    class Crash(RuntimeError):
        pass

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def batch_end(self, state, logger) -> None:
        if state.timestamp.batch == self.batch:
            raise CrashAt.Crash(f"crash at batch {self.batch}")


def latest_payload(run_dir: Path) -> dict[str, Any]:
    latest = CheckpointStore(Path(run_dir) / "checkpoints", keep=1).latest()
    assert latest is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(latest)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["ba"], r["train/loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "train/loss" in r]


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["ba"], r["eval/loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval/loss" in r]


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"tensors differ at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for key in a:
            assert_tree_equal(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def recipe(data: dict[str, Any]) -> Recipe:
    return Recipe.model_validate(data)


def assert_resume_is_bitwise(tmp_path: Path, config: dict[str, Any], state: str = "AdamW state") -> None:
    """G7: a run crashed after batch 5 and rerun ends with weights and optimizer state bitwise the uninterrupted
    run's (``state``: what the optimizer state is called in a failure)."""
    reference, resumed, _ = crash_and_resume(tmp_path, config, crash_at=5)
    a, b = latest_payload(reference), latest_payload(resumed)
    assert_tree_equal(a["model"], b["model"], "weights")
    assert_tree_equal(a["optimizer"], b["optimizer"], state)


def crash_and_resume(tmp_path: Path, config: dict[str, Any], crash_at: int) -> tuple[Path, Path, int]:
    """Train uninterrupted into ``reference``; train again into ``resumed``, crash after batch ``crash_at``,
    rerun to resume and finish. Returns both run directories and the batch the rerun resumed from."""
    from smalti.trainer import Trainer

    reference_dir, resumed_dir = tmp_path / "reference", tmp_path / "resumed"
    Trainer(recipe(config), reference_dir).fit()
    with pytest.raises(CrashAt.Crash):
        Trainer(recipe(config), resumed_dir, callbacks=[CrashAt(crash_at)]).fit()
    resumed = Trainer(recipe(config), resumed_dir)
    assert resumed.resumed_from is not None and resumed.resumed_from.batch < crash_at
    resumed.fit()
    return reference_dir, resumed_dir, resumed.resumed_from.batch
