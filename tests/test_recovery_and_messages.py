"""What a new user hit: dead ends after a damaged checkpoint, tracebacks where a line belongs, cut names."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from smalti.trainer import Trainer

from conftest import REPO, smalti_cli, tiny_recipe, write_recipe
from helpers import CrashAt, assert_tree_equal, latest_payload, losses, recipe


def _one_line(result, *fragments: str) -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ a damaged checkpoint is not a dead end


@pytest.fixture
def reference_and_damaged(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, model={"dropout": 0.1}, train={"max_duration": "24ba"},
                         checkpoint={"interval": "4ba", "keep": 3})
    reference = tmp_path / "reference"
    Trainer(recipe(config), reference).fit()
    damaged = tmp_path / "damaged"
    with pytest.raises(CrashAt.Crash):  # the same run, stopped after its checkpoint at batch 12
        Trainer(recipe(config), damaged, callbacks=[CrashAt(13)]).fit()
    return config, reference, damaged


@pytest.mark.parametrize("damage", ["truncated", "flipped", "deleted", "pointer lost"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(reference_and_damaged, damage, capfd):
    config, reference, damaged = reference_and_damaged
    folder = damaged / "checkpoints"
    latest = folder / "ep0-ba12.pt"
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:1000])
    elif damage == "flipped":
        data = bytearray(latest.read_bytes())
        data[len(data) // 3] ^= 0x10
        latest.write_bytes(bytes(data))
    elif damage == "deleted":
        latest.unlink()
    else:
        (folder / "latest").unlink()
        latest.write_bytes(b"")  # and the newest file is empty
    capfd.readouterr()
    trainer = Trainer(recipe(config), damaged)
    notice = capfd.readouterr().err.strip().splitlines()
    assert trainer.resumed_from.batch == 8
    assert len(notice) == 1 and notice[0].endswith("resuming from ep0-ba8.pt, the newest intact checkpoint"), notice
    if damage != "pointer lost":
        assert "ep0-ba12.pt" in notice[0]
    trainer.fit()
    trainer.close()
    # The same run still ends bitwise identical: the steps after ba8 were replayed from the same state.
    for key in ("model", "optimizer", "rng", "timestamp"):
        assert_tree_equal(latest_payload(reference)[key], latest_payload(damaged)[key], key)
    assert losses(reference) == losses(damaged)


def test_no_intact_checkpoint_is_an_error_never_a_silent_restart(reference_and_damaged):
    from smalti.errors import CheckpointError

    config, _, damaged = reference_and_damaged
    for path in (damaged / "checkpoints").glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"checkpoints: no intact checkpoint \(.*ep0-ba12\.pt.*ep0-ba4\.pt"):
        Trainer(recipe(config), damaged)


# ------------------------------------------------------------------ a finished run, Ctrl-C, where the run goes


def test_rerunning_a_finished_run_prints_its_recorded_summary(tmp_path, tiny_corpus):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_corpus, train={"max_duration": "8ba"}))
    first = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert first.returncode == 0, first.stderr
    trained = (tmp_path / "run" / "metrics.jsonl").read_text()
    again = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert again.returncode == 0, again.stderr
    assert "the run is already complete (epoch 0, batch 8); its recorded summary" in again.stdout
    assert "nan" not in again.stdout and "resuming" not in again.stderr and "0 tokens/s" not in again.stdout
    last_loss = losses(tmp_path / "run")[-1][1]
    assert f"{last_loss:.4f}" in again.stdout  # the recorded final train loss, not a NaN
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == trained  # nothing was trained or logged


def test_ctrl_c_names_the_checkpoint_kept(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "100000ba"}, checkpoint={"interval": "2ba", "keep": 1},
                         logging={"console": False})
    path = write_recipe(tmp_path / "r.yaml", config)
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "smalti", "train", str(path), "--run-dir", str(run)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "checkpoints" / "latest").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("smalti: interrupted; the last checkpoint is ") and "run the same command again" in line
    kept = line.split("the last checkpoint is ")[1].split(":")[0]
    assert kept.startswith(str(run / "checkpoints")) and torch.load(kept, weights_only=True)["timestamp"]["batch"] >= 2


def test_a_run_dir_that_is_a_file_is_one_line(tmp_path, tiny_corpus):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_corpus))
    (tmp_path / "taken").write_text("mine")
    _one_line(smalti_cli("train", str(path), "--run-dir", str(tmp_path / "taken")),
              "taken: the run directory is a file")
    assert (tmp_path / "taken").read_text() == "mine"


def test_a_refused_recipe_leaves_no_run_directory(governed, tmp_path):
    """Data and policy checks fail before the run directory exists (an empty one was left behind)."""
    from conftest import write_policy

    bad_policy = write_policy(governed, tmp_path / "policy.yaml", [{"classes": ["gutenberg/nope"], "params": ["tok_emb"],
                                                                  "action": "deny"}])
    for config, fragment in ((governed.recipe(governance={"policy": str(bad_policy)}), "class 'gutenberg/nope'"),
                             (governed.recipe(data={"url": str(tmp_path / "no-dataset")}), "no manifest.json")):
        path = write_recipe(tmp_path / "r.yaml", config)
        _one_line(smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run")), fragment)
        assert not (tmp_path / "run").exists()


def test_sample_and_eval_on_a_run_trained_with_a_custom_model(tmp_path, tiny_corpus):
    from smalti.build import build_data
    from smalti.distributed import DistInfo
    from smalti.models.gpt import GPT, GPTConfig

    config = recipe(tiny_recipe(tiny_corpus, train={"max_duration": "2ba"}))
    data = build_data(config, DistInfo())
    custom = GPT(GPTConfig(vocab_size=data.tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=48))
    Trainer(config, tmp_path / "run", model=custom, data=data).fit()
    for command in (["sample", str(tmp_path / "run"), "--prompt", "A"], ["eval", str(tmp_path / "run")]):
        _one_line(smalti_cli(*command), "ep0-ba2.pt: its weights do not fit the model the recipe describes",
                  "own model=")


# ------------------------------------------------------------------ names and identifiers


def test_a_class_count_of_one_is_singular(governed, tmp_path):
    from test_ledger import TEMPEST, train

    run = train(governed, tmp_path / "run", train={"max_duration": "6ba"})
    plan = smalti_cli("forget", str(run), "--class", TEMPEST, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"{TEMPEST} (1 class) first contributed" in plan.stdout
    misspelt = smalti_cli("forget", str(run), "--class", "gutenberg/comedy/tempset", "--dry-run")
    line = _one_line(misspelt, "--class 'gutenberg/comedy/tempset'", f"did you mean '{TEMPEST}'")
    assert len(line) < 300  # the suggestion, not the list of every class
    audit = smalti_cli("audit", str(run), "--class", "tempest")
    _one_line(audit, f"did you mean '{TEMPEST}'")


def test_audit_takes_an_example_by_its_dataset_id(governed, tmp_path):
    from test_ledger import train

    run = train(governed, tmp_path / "run", train={"max_duration": "6ba"})
    by_index = smalti_cli("audit", str(run), "--example", "7", "--json")
    assert by_index.returncode == 0, by_index.stderr
    import json

    from smalti.build import build_data
    from smalti.distributed import DistInfo

    data = build_data(recipe(governed.recipe()), DistInfo())
    name = data.train.example_ids(torch.tensor([7]))[0]  # e.g. hamlet/train/000007
    data.train.close(), data.val.close()
    by_id = smalti_cli("audit", str(run), "--example", name, "--json")
    assert by_id.returncode == 0, by_id.stderr
    answer = json.loads(by_id.stdout)
    assert answer["example"] == 7 and answer["id"] == name
    assert {k: v for k, v in answer.items() if k != "id"} == {k: v for k, v in json.loads(by_index.stdout).items()
                                                              if k != "id"}
    text = smalti_cli("audit", str(run), "--example", name)
    assert f"example {name} (training example 7)" in text.stdout
    _one_line(smalti_cli("audit", str(run), "--example", "nowhere/train/000001"), "no training example of")


def test_piped_output_never_cuts_a_name(governed, tmp_path):
    from test_ledger import train

    run = train(governed, tmp_path / "run", train={"max_duration": "6ba"})
    layer = smalti_cli("audit", str(run), "--layer", "tok_emb")
    assert layer.returncode == 0 and "…" not in layer.stdout
    for name in ("gutenberg/tragedy/hamlet", "gutenberg/tragedy/macbeth", "gutenberg/comedy/tempest"):
        assert name in layer.stdout
    summary = smalti_cli("audit", str(run), "--class", "gutenberg")
    assert summary.returncode == 0 and "…" not in summary.stdout
    assert summary.stdout.splitlines()[0] == "gutenberg: 48 examples in 6 steps: 1-6; touched 15 of 15 layers"


def test_step_lists_are_compressed_into_ranges_or_a_span():
    from smalti.governance.ledger.audit import describe_steps

    assert describe_steps(list(range(1, 751)) + list(range(900, 1501))) == "1,351 steps: 1-750, 900-1500"
    scattered = list(range(9, 1500, 8))  # a class in every eighth step: hundreds of one-step ranges
    assert describe_steps(scattered) == f"{len(scattered)} steps from 9 to {scattered[-1]}"
    assert describe_steps([5]) == "1 step: 5" and describe_steps([]) == "no step"


def test_an_unknown_url_protocol_names_what_to_install():
    from smalti.errors import DataError
    from smalti.io import remote_filesystem

    with pytest.raises(DataError, match=r"gcs://b/x: .*gcsfs.*smalti\[remote\]"):
        remote_filesystem("gcs://b/x")
