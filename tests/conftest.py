"""Shared fixtures: a tiny corpus cut from the real plays, and recipes small enough to train in seconds."""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "shakespeare"
# Bitwise comparisons need a fixed summation order: one intra-op thread, in this process and in
# every subprocess the tests start (a busy machine can otherwise change how work is split).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_DYNAMIC"] = "FALSE"

TINY_WORKS = {"hamlet": "tragedy", "macbeth": "tragedy", "tempest": "comedy", "sonnets": "poetry"}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four works, 6,000 characters each (from the middle of the real texts), with a manifest."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    rows = []
    for work, genre in TINY_WORKS.items():
        text = gzip.decompress((SHAKESPEARE / f"{work}.txt.gz").read_bytes()).decode("utf-8")
        excerpt = text[20_000:26_000]
        (root / f"{work}.txt").write_text(excerpt, encoding="utf-8")
        digest = hashlib.sha256(excerpt.encode("utf-8")).hexdigest()
        rows.append({"work": work, "title": work.title(), "genre": genre, "sha256": digest})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["work", "title", "genre", "sha256"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def tiny_recipe(corpus: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for a 2-layer, 32-wide GPT; ``sections`` update it section by section."""
    recipe: dict[str, Any] = {
        "seed": 3,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16},
        "data": {"corpus": str(corpus)},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "scheduler": {"warmup": "4ba"},
        "train": {"max_duration": "24ba", "global_batch_size": 8},
        "eval": {"interval": "8ba", "max_samples": 32, "batch_size": 16},
        "checkpoint": {"interval": "8ba", "keep": 2},
        "logging": {"console": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **values}
        else:
            recipe[name] = values
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def tessera_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh interpreter (single-threaded: see the top of this file)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "tessera", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )
