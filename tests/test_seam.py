"""The step seam: a new step behaviour is one class plugged into the loop, governance is nothing but such
classes, and the typed checkpoint payload reads what older checkpoints hold and refuses what no checkpoint
should (docs/architecture.md, "The step seam" and "Adding a step behaviour")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from smalti.checkpoint import CheckpointStore, load_checkpoint
from smalti.errors import CheckpointError, RecipeError
from smalti.payload import read_payload
from smalti.train.loop import TrainingLoop
from smalti.train.seam import SeamContext, StepSeam
from smalti.trainer import Trainer

from conftest import smalti_cli, tiny_recipe
from helpers import assert_tree_equal, latest_payload, recipe


class FrozenStep(StepSeam):
    """Named parameters never learn: their gradients are dropped before clipping and the step."""

    def __init__(self, context: SeamContext, frozen: set[str]) -> None:
        super().__init__(context.dist)
        self.frozen = [p for n, p in context.model.named_parameters() if n in frozen]

    def before_unscale(self, inverse_scale: float) -> None:
        for parameter in self.frozen:
            parameter.grad = None


def _config(tiny_corpus, **train):
    return tiny_recipe(tiny_corpus, train={"max_duration": "6ba", "global_batch_size": 8, "microbatch_size": 4,
                                           **train})


def test_a_step_behaviour_is_one_class_plugged_into_the_loop(tmp_path, tiny_corpus):
    config = _config(tiny_corpus)
    with TrainingLoop(recipe(config), tmp_path / "initial") as untrained:
        initial = {n: p.detach().clone() for n, p in untrained.model.named_parameters()}
    frozen = "tok_emb.weight"
    assert frozen in initial
    with TrainingLoop(recipe(config), tmp_path / "frozen", seam=lambda c: FrozenStep(c, {frozen})) as loop:
        loop.fit()
        after = {n: p.detach().clone() for n, p in loop.model.named_parameters()}
    assert torch.equal(after[frozen], initial[frozen])  # bitwise: it never learned
    moved = [n for n in initial if n != frozen and not torch.equal(after[n], initial[n])]
    assert len(moved) == len(initial) - 1


def test_the_plain_loop_is_the_trainer_without_governance(tmp_path, tiny_corpus):
    config = _config(tiny_corpus)
    with TrainingLoop(recipe(config), tmp_path / "loop") as loop:
        loop.fit()
    with Trainer(recipe(config), tmp_path / "trainer") as trainer:
        trainer.fit()
        assert type(trainer.seam) is StepSeam and trainer.router is None and trainer.ledger is None
    loop_payload, trainer_payload = latest_payload(tmp_path / "loop"), latest_payload(tmp_path / "trainer")
    assert_tree_equal(loop_payload["model"], trainer_payload["model"])
    assert_tree_equal(loop_payload["optimizer"], trainer_payload["optimizer"])


def test_governance_refuses_through_the_seam(tmp_path, governed):
    """An algorithm that computes gradients outside the routed backward pass meets the ledger at the seam's
    check, before anything is written."""
    config = governed.recipe(algorithms={"sam": {}},
                             governance={"ledger": {"enabled": True, "key": str(governed.key("trainer"))}})
    with pytest.raises(RecipeError, match="algorithm SAM computes gradients outside the routed backward pass"):
        Trainer(recipe(config), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_the_payload_reader_names_a_bad_field_and_fills_what_older_checkpoints_lack(tmp_path, tiny_corpus):
    config = _config(tiny_corpus, max_duration="2ba")
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    path = CheckpointStore(tmp_path / "run" / "checkpoints", keep=1).latest()
    raw = load_checkpoint(path)
    payload = read_payload(raw, str(path))
    assert payload.timestamp == raw["timestamp"] and payload.model is raw["model"]
    assert {k: v for k, v in payload.to_dict().items()} == {k: v for k, v in raw.items() if k not in ("model", "optimizer")}
    assert list(payload.to_dict()) == [k for k in raw if k not in ("model", "optimizer")]  # the order written

    older = {k: v for k, v in raw.items() if k not in ("train_loss", "wall_seconds", "eval_by_class", "surgery")}
    filled = read_payload(older, "older.pt")
    assert math.isnan(filled.train_loss) and filled.wall_seconds == 0.0
    assert filled.eval_by_class == {} and filled.surgery == []

    for field, value, said in [("evaluated_at", "3", "'evaluated_at' is a str, not a int"),
                               ("rng", None, "'rng' is a NoneType, not a list or tuple"),
                               ("ledger", [1], "'ledger' is a list, not a dict or None"),
                               ("evaluated_at", True, "'evaluated_at' is a bool")]:
        with pytest.raises(CheckpointError, match=said) as refused:
            read_payload(dict(raw, **{field: value}), "bad.pt")
        assert str(refused.value).startswith("bad.pt: ") and "\n" not in str(refused.value)
    with pytest.raises(CheckpointError, match="bad.pt: checkpoint has no 'sampler'"):
        read_payload({k: v for k, v in raw.items() if k != "sampler"}, "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: not a Smalti checkpoint"):
        read_payload([raw], "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt"):
        read_payload(dict(raw, format="smalti-checkpoint/0"), "bad.pt")


def test_resume_refuses_a_checkpoint_with_a_field_of_the_wrong_type(tmp_path, tiny_corpus):
    config = _config(tiny_corpus, max_duration="2ba")
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    store = CheckpointStore(tmp_path / "run" / "checkpoints", keep=3)
    path = store.latest()
    raw = load_checkpoint(path)
    raw["eval_metrics"] = "<script>"  # written by someone hostile, re-hashed so that only the field is wrong
    store.save(raw, path.name)
    more = dict(config, train=dict(config["train"], max_duration="4ba"))
    with pytest.raises(CheckpointError, match="checkpoint field 'eval_metrics' is a str, not a dict"):
        Trainer(recipe(more), tmp_path / "run")


PRE_SEAM = Path(__file__).parent / "data" / "pre-seam"


def test_a_run_written_before_the_seam_still_reads(tmp_path):
    """The checkpoint, ledger and dataset of tests/data/pre-seam were written by the code before the step seam:
    the ledger verifies (deeply, against the trainer key), the dataset loads and verifies, and the checkpoint
    loads into a new run bit for bit and trains on with a new ledger."""
    import shutil

    from smalti.build import build_data
    from smalti.distributed import DistInfo

    fixture = tmp_path / "pre-seam"
    shutil.copytree(PRE_SEAM, fixture)
    verified = smalti_cli("ledger", "verify", str(fixture / "run"), "--deep", "--pubkey", str(fixture / "keys" / "trainer.pub"))
    assert verified.returncode == 0, verified.stderr

    written = CheckpointStore(fixture / "run" / "checkpoints", keep=1).latest()
    old = load_checkpoint(written)
    payload = read_payload(old, str(written))
    assert payload.ledger_head is not None and payload.timestamp["batch"] == 4

    data = {"corpus": None, "url": str(fixture / "dataset"), "taxonomy": str(fixture / "taxonomy.yaml"),
            "trust": str(fixture / "keys" / "data-governance.pub"), "cache_dir": str(tmp_path / "cache")}
    config = tiny_recipe(Path("unused"), data=data, train={"max_duration": "6ba"},
                         checkpoint={"interval": "2ba", "keep": 1, "load_path": str(written)},
                         eval={"interval": "2ba", "max_samples": 16, "batch_size": 16},
                         governance={"ledger": {"enabled": True, "key": str(fixture / "keys" / "trainer.key"),
                                                "entropy_every": 0}})
    loaded = build_data(recipe(config), DistInfo())
    assert loaded.provenance["manifest_version"] == 1 and loaded.class_names == old["classes"]
    loaded.train.close(), loaded.val.close()
    with Trainer(recipe(config), tmp_path / "on") as trainer:
        assert trainer.resumed_from is not None and trainer.resumed_from.batch == 4
        assert_tree_equal(trainer.model.state_dict(), old["model"])
        trainer.fit()
    assert latest_payload(tmp_path / "on")["timestamp"]["batch"] == 6
    assert smalti_cli("ledger", "verify", str(tmp_path / "on")).returncode == 0
