"""kill -9 at random moments and in the middle of a checkpoint write; the resumed run must be bitwise identical."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from smalti.checkpoint import CheckpointStore, load_checkpoint

from conftest import REPO, smalti_cli, tiny_recipe, write_recipe
from helpers import assert_tree_equal, eval_losses, latest_payload, losses

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _recipe(tmp_path, tiny_corpus):
    from smalti.trust.keys import write_key_pair

    key, _ = write_key_pair("trainer", tmp_path / "keys")
    config = tiny_recipe(
        tiny_corpus,
        model={"dropout": 0.1},
        train={"max_duration": "240ba", "microbatch_size": 4},
        eval={"interval": "40ba"},
        checkpoint={"interval": "20ba", "keep": 2},
        algorithms={"ema": {"half_life": "10ba"}},
        governance={"ledger": {"enabled": True, "key": str(key), "entropy_every": 25, "flush_every": 7}},
    )
    return write_recipe(tmp_path / "recipe.yaml", config)


def _assert_same_run(reference, resumed):
    a, b = latest_payload(reference), latest_payload(resumed)
    for key in ("model", "optimizer", "rng", "algorithms", "timestamp", "eval_metrics", "eval_by_class"):
        assert_tree_equal(a[key], b[key], key)
    assert losses(reference) == losses(resumed)
    assert eval_losses(reference) == eval_losses(resumed)
    # G7 for the ledger: the same entries, byte for byte, and the same signed roots.
    with sqlite3.connect(reference / "ledger.sqlite") as x, sqlite3.connect(resumed / "ledger.sqlite") as y:
        query = "SELECT idx, step, leaf, data FROM entries ORDER BY idx"
        assert x.execute(query).fetchall() == y.execute(query).fetchall()
        query = "SELECT size, root, final FROM heads ORDER BY size"
        assert x.execute(query).fetchall() == y.execute(query).fetchall()
    assert smalti_cli("ledger", "verify", str(resumed), "--deep").returncode == 0


def _latest_name(run_dir):
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None


def _hf_lora_recipe(tmp_path, governed):
    """A Hugging Face Llama with per-class LoRA adapters under a policy, with the ledger."""
    from conftest import write_policy
    from test_hf_models import HAMLET, hf_model

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = governed.recipe(
        model=hf_model("llama", classes=[HAMLET], freeze_base=False, dropout=0.1),
        train={"max_duration": "100ba", "microbatch_size": 4},
        eval={"interval": "40ba"}, checkpoint={"interval": "20ba", "keep": 2},
        governance={"policy": str(policy),
                    "ledger": {"enabled": True, "key": str(governed.key("trainer")), "entropy_every": 25, "flush_every": 7}},
    )
    return write_recipe(tmp_path / "recipe.yaml", config)


def _moe_recipe(tmp_path, governed):
    """A Mixtral mixture of experts with the load-balancing loss and the router's jitter noise, a class denied
    an expert and the gates, with the ledger."""
    from conftest import write_policy
    from test_hf_models import HAMLET
    from test_moe import moe_model

    policy = write_policy(governed, tmp_path / "policy.yaml", [{"classes": [HAMLET], "action": "deny",
                                                               "params": ["model.layers.*.mlp.experts.1", "model.layers.*.mlp.gate"]}])
    model = moe_model("mixtral", aux=True)
    model["hf"]["config"]["router_jitter_noise"] = 0.1
    config = governed.recipe(
        model=model, data={"batching": "random"}, train={"max_duration": "40ba", "microbatch_size": 4},
        eval={"interval": "20ba"}, checkpoint={"interval": "10ba", "keep": 2},
        governance={"policy": str(policy),
                    "ledger": {"enabled": True, "key": str(governed.key("trainer")), "entropy_every": 25, "flush_every": 7}},
    )
    return write_recipe(tmp_path / "recipe.yaml", config)


@pytest.mark.parametrize("model", ["gpt", "hf-lora", "moe"])
def test_random_kill_9_then_rerun_is_bitwise_identical(tmp_path, tiny_corpus, governed, model):
    recipes = {"gpt": lambda: _recipe(tmp_path, tiny_corpus), "hf-lora": lambda: _hf_lora_recipe(tmp_path, governed),
               "moe": lambda: _moe_recipe(tmp_path, governed)}
    recipe = recipes[model]()
    reference = tmp_path / "reference"
    assert smalti_cli("train", str(recipe), "--run-dir", str(reference)).returncode == 0

    killed = tmp_path / "killed"
    rng = random.Random(int(os.environ.get("SMALTI_TEST_SEED", "1234")))
    kills = 0
    for _ in range(1 if model == "moe" else 3):  # one kill for the MoE: each restart costs a transformers import
        before = _latest_name(killed)
        process = subprocess.Popen(
            [sys.executable, "-m", "smalti", "train", str(recipe), "--run-dir", str(killed)],
            env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.time() + 120
        while _latest_name(killed) == before and process.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))  # somewhere in the next steps, possibly mid-checkpoint
        if process.poll() is not None:
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
    assert kills >= 1, "training finished before any kill landed; make the run longer"

    final = smalti_cli("train", str(recipe), "--run-dir", str(killed))
    assert final.returncode == 0, final.stderr
    _assert_same_run(reference, killed)


KILL_IN_SAVE = """
import os, signal, sys
import torch
import smalti.checkpoint as checkpoint

calls = 0
real_save = torch.save

def save_then_die(obj, handle, *args, **kwargs):
    global calls
    calls += 1
    if calls == int(os.environ["KILL_ON_SAVE"]):
        handle.write(b"PK\\x03\\x04 half of a checkpoint")
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)

checkpoint.torch.save = save_then_die
from smalti.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, tiny_corpus):
    recipe = _recipe(tmp_path, tiny_corpus)
    reference = tmp_path / "reference"
    assert smalti_cli("train", str(recipe), "--run-dir", str(reference)).returncode == 0

    killed = tmp_path / "killed"
    script = tmp_path / "kill_in_save.py"
    script.write_text(KILL_IN_SAVE)
    dying = subprocess.run(
        [sys.executable, str(script), "train", str(recipe), "--run-dir", str(killed)],
        env={**ENV, "KILL_ON_SAVE": "3"}, cwd=REPO, capture_output=True, text=True,
    )
    assert dying.returncode == -signal.SIGKILL
    folder = killed / "checkpoints"
    assert list(folder.glob(".ep0-ba60.pt.*.tmp")), "the half-written temp file should be left behind"
    assert not (folder / "ep0-ba60.pt").exists()
    assert _latest_name(killed) == "ep0-ba40.pt"
    assert load_checkpoint(folder / "ep0-ba40.pt")["timestamp"]["batch"] == 40

    final = smalti_cli("train", str(recipe), "--run-dir", str(killed))
    assert final.returncode == 0, final.stderr
    assert not list(folder.glob(".*.tmp"))
    assert CheckpointStore(folder, keep=2).latest().name == "ep1-ba240.pt"  # 168 batches per epoch
    _assert_same_run(reference, killed)
