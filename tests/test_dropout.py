"""Dropout on, as real models' default configs have it (GPT-2's is 0.1), for the bundled GPT and every Hugging Face
family, built from a config and loaded from a save_pretrained folder (which transformers returns in eval mode).

G7: a run interrupted and resumed equals the uninterrupted one bitwise (weights, optimizer, RNG, every ledger
entry). G5: an exact forget equals the run that never saw the class. And, the cause of the defect a new user hit,
checked directly: every module is in training mode at every step, before and after an evaluation. Evaluations run
every 2 batches and checkpoints every 4, so a process that resumes from a checkpoint has evaluated before it, as
the uninterrupted one had: a mode that only an evaluation switches on differs between the two."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import smalti_cli
from helpers import assert_tree_equal, crash_and_resume, latest_payload
from test_ledger import ledger_recipe

DROPOUT = {"llama": {"attention_dropout": 0.1}, "qwen2": {"attention_dropout": 0.1},
           "gpt2": {},  # its defaults: resid, embd and attn dropout 0.1
           "gpt_neox": {"attention_dropout": 0.1, "hidden_dropout": 0.1}}
CASES = [("gpt", "config")] + [(family, source) for family in sorted(DROPOUT) for source in ("config", "folder")]
TEMPEST = "gutenberg/comedy/tempest"


def _model(family: str, source: str, folder: Path) -> dict:
    from test_hf_models import CONFIGS

    if family == "gpt":
        return {"dropout": 0.1}
    settings = {**CONFIGS[family][0], **DROPOUT[family], "vocab_size": 128}
    if source == "config":
        return {"hf": {"config": settings}}
    if not (folder / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        kind = settings.pop("model_type")
        AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **settings)).save_pretrained(folder)
    return {"hf": {"path": str(folder)}}


def _config(governed, family: str, source: str, folder: Path, **sections) -> dict:
    model = {**governed.recipe()["model"], **_model(family, source, folder)}
    return ledger_recipe(governed, model=model, eval={"interval": "2ba", "max_samples": 16, "batch_size": 8},
                         checkpoint={"interval": "4ba", "keep": 4}, **sections)


def _mode_watch():
    """A callback that records, at every step's start, whether every module of the model is in training mode."""
    from smalti.core.callback import Callback

    class ModeAtEveryStep(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, bool]] = []

        def batch_start(self, state, logger) -> None:
            self.seen.append((state.timestamp.batch, all(m.training for m in state.model.modules())))

    return ModeAtEveryStep()


@pytest.mark.parametrize("family,source", CASES)
def test_every_module_trains_at_every_step_whatever_built_the_model(governed, tmp_path, family, source):
    from helpers import recipe
    from smalti.trainer import Trainer

    config = _config(governed, family, source, tmp_path / "folder", train={"max_duration": "5ba"})
    watch = _mode_watch()
    with Trainer(recipe(config), tmp_path / "run", callbacks=[watch]) as trainer:
        trainer.fit()
    assert watch.seen and all(training for _, training in watch.seen), watch.seen


@pytest.mark.parametrize("family,source", CASES)
def test_g7_an_interrupted_run_with_dropout_resumes_bitwise(governed, tmp_path, family, source):
    config = _config(governed, family, source, tmp_path / "folder", train={"max_duration": "8ba"})
    reference, resumed, start = crash_and_resume(tmp_path, config, crash_at=6)
    assert start == 4
    a, b = latest_payload(reference), latest_payload(resumed)
    for key in ("model", "optimizer", "rng", "eval_by_class"):
        assert_tree_equal(a[key], b[key], key)
    with sqlite3.connect(reference / "ledger.sqlite") as x, sqlite3.connect(resumed / "ledger.sqlite") as y:
        query = "SELECT idx, data FROM entries ORDER BY idx"
        assert x.execute(query).fetchall() == y.execute(query).fetchall()


@pytest.mark.parametrize("family,source", [("gpt", "config"), ("gpt2", "folder")])
def test_g5_exact_forget_with_dropout_equals_the_counterfactual(governed, tmp_path, family, source):
    from test_deletion import _train_config, late_config

    base, _ = late_config(governed)
    folder = tmp_path / "folder"
    model = _model(family, source, folder)
    config = {**base, "model": {**base["model"], **model},
              "eval": {"interval": "2ba", "max_samples": 16, "batch_size": 8}}
    parent = _train_config(config, tmp_path / "parent")
    done = smalti_cli("forget", str(parent), "--class", TEMPEST, "--out", str(tmp_path / "forgot"))
    assert done.returncode == 0, done.stderr
    counterfactual = _train_config({**config, "data": {**config["data"], "exclude_classes": [TEMPEST]}},
                                   tmp_path / "counterfactual")
    assert_tree_equal(latest_payload(tmp_path / "forgot")["model"], latest_payload(counterfactual)["model"], "model")
