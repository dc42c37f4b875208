"""TensorBoard and Weights & Biases (issue 26): the loss and the governance signals, read back with each tracker's
own reader; a kill -9 and resume repeats no step; a tracker that fails warns once and changes nothing."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, smalti_cli, write_policy, write_recipe
from helpers import latest_payload
from test_ledger import HAMLET, TEMPEST, ledger_recipe

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

STEPS = 12
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}


def _recipe(governed, tmp_path: Path, trackers: bool = True, **logging) -> Path:
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": ["*"], "params": ["blocks.0"], "phase": "6ba..12ba", "action": "deny"}],
                          [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = ledger_recipe(
        governed, governance={"policy": str(policy)}, model={"adapters": {"classes": [HAMLET], "hidden": 8}},
        data={"batching": "per_class"}, train={"max_duration": f"{STEPS}ba", "microbatch_size": 2},
        checkpoint={"interval": "4ba"}, eval={"interval": "6ba"},
        logging={"console": False, "interval": "2ba", **({"tensorboard": True,
                 "wandb": {"project": "smalti-test", "mode": "offline"}} if trackers else {}), **logging})
    return write_recipe(tmp_path / "recipe.yaml", config)


def tensorboard_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series, as TensorBoard's own readers give it (orphaned steps of a killed run purged): the
    legacy accumulator and the plugin one behind `tensorboard --load_fast=false` must agree."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator

    legacy = event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    legacy.Reload()
    found = {tag: [(e.step, e.value) for e in legacy.Scalars(tag)] for tag in legacy.Tags()["scalars"]}
    plugin = plugin_event_accumulator.EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0},
                                                       purge_orphaned_data=True)
    plugin.Reload()
    from tensorboard.util import tensor_util

    seen = {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in plugin.Tensors(tag)]
            for tag in found}
    assert {tag: [s for s, _ in v] for tag, v in seen.items()} == {tag: [s for s, _ in v] for tag, v in found.items()}
    return found


def wandb_history(run: Path) -> list[dict[str, float]]:
    """Every history row of every W&B offline run under ``run``, decoded with W&B's own protobuf schema.

    A ``.wandb`` file is a LevelDB-style log (32 KiB blocks of records with a 7-byte header: CRC, length, type)
    after W&B's 7-byte file header; a killed process may leave a torn last record, which is dropped."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        data, block, pieces = path.read_bytes(), 32768, b""
        offset = 7
        while offset + 7 <= len(data):
            if block - offset % block < 7:  # a block's tail too short for a header is padding
                offset += block - offset % block
                continue
            _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
            if kind == 0 or offset + 7 + length > len(data):
                break
            pieces += data[offset + 7:offset + 7 + length]
            offset += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pieces)
                pieces = b""
                if record.WhichOneof("record_type") == "history":
                    import json

                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
    return rows


@pytest.fixture(scope="module")
def reference(governed, tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    recipe = _recipe(governed, root)
    done = smalti_cli("train", str(recipe), "--run-dir", str(root / "run"), env={"WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr
    return root / "run", recipe


def test_tensorboard_holds_the_loss_and_the_governance_signals_at_every_logged_step(reference):
    run, _ = reference
    scalars = tensorboard_scalars(run)
    logged = list(range(2, STEPS + 1, 2))
    assert [step for step, _ in scalars["train/loss"]] == logged
    assert [step for step, _ in scalars["eval/loss"]] == [6, 12]
    # Per-class gradient shares of each layer: Hamlet's examples reach only their adapter (the exclusive rule).
    shares = {tag for tag in scalars if tag.startswith("governance/share/")}
    assert any(tag.endswith("/" + TEMPEST) for tag in shares) and any(tag.endswith("/" + HAMLET) for tag in shares)
    hamlet_layers = {tag.split("/")[2] for tag in shares if tag.endswith("/" + HAMLET)
                     and any(value > 0 for _, value in scalars[tag])}
    assert hamlet_layers and all("adapters" in layer for layer in hamlet_layers), hamlet_layers
    # The policy's second phase (steps 7-12) freezes blocks.0: its MLP reads 1 before and 0 after; the phase moves.
    block0 = dict(scalars["governance/updated/blocks.0.mlp.fc"])
    assert block0[6] == 1.0 and block0[8] == 0.0 and block0[12] == 0.0
    phase = dict(scalars["governance/phase"])
    assert phase[2] == 0.0 and phase[7] == 1.0 and phase[12] == 1.0  # logged at the change (step 7) too
    assert [step for step, _ in scalars["governance/layers_frozen"]][:2] == [1, 2]
    entropy = [tag for tag in scalars if tag.startswith("governance/entropy/")]
    assert entropy and {step for step, _ in scalars[entropy[0]]} == {4, 8, 12}  # ledger.entropy_every: 4
    # The same losses as metrics.jsonl, the run's own record.
    import json

    jsonl = {r["ba"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "train/loss" in r}
    assert all(abs(value - jsonl[step]) < 1e-6 for step, value in scalars["train/loss"])


def test_wandb_offline_history_holds_each_step_once_with_the_governance_signals(reference):
    run, _ = reference
    rows = wandb_history(run)
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS
    by_step = {row["_step"]: row for row in rows}
    assert all("train/loss" in by_step[s] for s in range(2, STEPS + 1, 2))
    assert any(key.startswith("governance/share/") for key in by_step[4])
    assert by_step[8]["governance/updated/blocks.0.mlp.fc"] == 0 and by_step[4]["governance/updated/blocks.0.mlp.fc"] == 1
    assert (run / "wandb" / "smalti-committed.json").is_file()
    run_ids = {p.name.split("-")[-1] for p in run.glob("wandb/offline-run-*")}
    assert len(run_ids) == 1 and latest_payload(run)["callbacks"]["WandbLogger"]["run_id"] in run_ids


KILL_AFTER = """
import os, signal, sys, time
from smalti.config import load_recipe
from smalti.core.callback import Callback
from smalti.loggers.tensorboard import TensorBoardLogger
from smalti.trainer import Trainer

class KillAfter(Callback):
    def batch_end(self, state, logger):
        if state.timestamp.batch == int(sys.argv[3]):
            for destination in trainer.logger.destinations:  # the worst case: what followed the checkpoint
                if isinstance(destination, TensorBoardLogger) and destination._writer is not None:
                    destination._writer.flush()                # reached the event file before the kill
            time.sleep(0.5)  # a kill later than W&B's 0.1 s file flush after the checkpoint's hand-over
            os.kill(os.getpid(), signal.SIGKILL)

trainer = Trainer(load_recipe(sys.argv[1]), sys.argv[2], callbacks=[KillAfter()])
trainer.fit()
"""


@pytest.mark.slow
def test_a_killed_and_resumed_run_appends_to_the_same_runs_without_repeating_a_step(reference, tmp_path):
    run, recipe = reference
    killed = tmp_path / "killed"
    script = tmp_path / "kill_after.py"
    script.write_text(KILL_AFTER)
    dying = subprocess.run([sys.executable, str(script), str(recipe), str(killed), "7"], env=ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    before = tensorboard_scalars(killed)
    assert max(step for step, _ in before["train/loss"]) == 6  # logged past the checkpoint at 4, then killed
    resumed = smalti_cli("train", str(recipe), "--run-dir", str(killed), env={"WANDB_SILENT": "true"})
    assert resumed.returncode == 0, resumed.stderr

    after, expected = tensorboard_scalars(killed), tensorboard_scalars(run)
    for tag in ("train/loss", "governance/phase", "governance/updated/blocks.0.mlp.fc"):
        assert after[tag] == expected[tag], tag  # each step once, with the uninterrupted run's values
    rows = wandb_history(killed)
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)) and set(steps) == {row["_step"] for row in wandb_history(run)}
    assert [r.get("train/loss") for r in rows] == [r.get("train/loss") for r in wandb_history(run)]
    run_ids = {p.name.split("-")[-1] for p in killed.glob("wandb/offline-run-*")}
    assert len(run_ids) == 1 and len(list(killed.glob("wandb/offline-run-*"))) == 2  # one run id, two sessions


def test_a_failing_tracker_warns_once_and_leaves_training_bitwise_unchanged(governed, tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert smalti_cli("train", str(_recipe(governed, plain, trackers=False)), "--run-dir",
                      str(plain / "run")).returncode == 0
    failing = tmp_path / "failing"
    failing.mkdir()
    recipe = _recipe(governed, failing, wandb={"project": "smalti-test", "mode": "online", "init_timeout": 3})
    (failing / "run").mkdir()
    (failing / "run" / "tensorboard").write_text("a file where TensorBoard's folder goes")
    # W&B online against a closed port on loopback: it cannot be reached.
    done = smalti_cli("train", str(recipe), "--run-dir", str(failing / "run"),
                      env={"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_API_KEY": "0" * 40})
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("smalti: warning:")]
    assert sum("TensorBoard logging failed" in w for w in warnings) == 1, done.stderr
    assert sum("Weights & Biases logging failed" in w for w in warnings) == 1, done.stderr
    a, b = latest_payload(plain / "run")["model"], latest_payload(failing / "run")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)  # bitwise the run without trackers
    assert latest_payload(failing / "run")["callbacks"]["WandbLogger"] == {}


def test_a_tracker_without_its_package_is_a_one_line_error(governed, tmp_path):
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('not installed')\n")
    done = smalti_cli("train", str(_recipe(governed, tmp_path)), "--run-dir", str(tmp_path / "run"),
                      env={"PYTHONPATH": str(tmp_path / "shadow")})
    assert done.returncode != 0 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "logging.wandb needs Weights & Biases: pip install 'smalti[wandb]'" in done.stderr
