"""DDP under real torchrun with 2 gloo processes on CPU."""

import os
import subprocess
import sys

import pytest
import torch

from smalti.core.callback import Callback
from smalti.trainer import Trainer

from conftest import REPO, free_port, smalti_cli, tiny_recipe, write_recipe
from helpers import assert_tree_equal, eval_losses, latest_payload, losses, recipe

pytestmark = pytest.mark.slow


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "smalti", *args,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_two_gloo_ranks_match_single_process(tmp_path, tiny_corpus):
    config = tiny_recipe(
        tiny_corpus,
        train={"max_duration": "24ba", "global_batch_size": 8, "microbatch_size": 2},
        logging={"console": True},
    )
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    single = smalti_cli("train", str(recipe), "--run-dir", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    ddp = torchrun(2, "train", str(recipe), "--run-dir", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("summary") == 1  # only rank 0 reports

    one, two = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [b for b, _ in one] == [b for b, _ in two] == list(range(1, 25))  # rank 0 logs each step once
    worst = max(abs(a - b) for (_, a), (_, b) in zip(one, two))
    assert worst < 1e-4, f"loss curves differ by {worst}"
    assert max(abs(a - b) for (_, a), (_, b) in zip(eval_losses(tmp_path / "single"), eval_losses(tmp_path / "ddp"))) < 1e-4
    payload = latest_payload(tmp_path / "ddp")
    assert len(payload["rng"]) == 2 and payload["timestamp"]["sample"] == 24 * 8
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [  # the lock: one per job, rank 0's
        ".smalti.lock", "algorithms.json", "checkpoints", "data.json", "metrics.jsonl", "recipe.yaml", "vocab.json"]
    assert (tmp_path / "ddp" / ".smalti.lock").read_text() == ""  # released at the end


def test_ddp_run_resumes_after_the_job_is_restarted(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "16ba"}, checkpoint={"interval": "4ba"})
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    first = torchrun(2, "train", str(recipe), "--run-dir", str(tmp_path / "run"), "--set", "train.max_duration=8ba")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, "train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert [b for b, _ in losses(tmp_path / "run")] == list(range(1, 17))
    assert latest_payload(tmp_path / "run")["timestamp"]["batch"] == 16


class RecordSamples(Callback):
    def __init__(self):
        self.ids = {}

    def after_dataloader(self, state, logger):
        self.ids[state.timestamp.batch + 1] = state.batch.sample_ids.clone()


def test_checkpoint_at_world_size_2_resumes_at_world_size_1_on_the_same_samples(governed, tmp_path):
    # A constant learning rate, so that stopping the first leg at 8ba does not change its schedule.
    config = governed.recipe(train={"max_duration": "16ba"}, checkpoint={"interval": "4ba"},
                             scheduler={"name": "constant", "warmup": "0ba"})
    path = write_recipe(tmp_path / "recipe.yaml", config)

    reference = RecordSamples()
    Trainer(recipe(config), tmp_path / "reference", callbacks=[reference]).fit()

    first = torchrun(2, "train", str(path), "--run-dir", str(tmp_path / "elastic"), "--set", "train.max_duration=8ba")
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(latest_payload(tmp_path / "elastic")["rng"]) == 2
    resumed = RecordSamples()
    trainer = Trainer(recipe(config), tmp_path / "elastic", callbacks=[resumed])
    assert trainer.resumed_from.batch == 8
    trainer.fit()
    assert sorted(resumed.ids) == list(range(9, 17))
    for step, ids in resumed.ids.items():
        assert torch.equal(ids, reference.ids[step]), step
    a, b = losses(tmp_path / "reference"), losses(tmp_path / "elastic")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 17))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


RANK_PROBE = """
import sys
import torch
from smalti.config import load_recipe
from smalti.trainer import Trainer

recipe = load_recipe(sys.argv[1])
trainer = Trainer(recipe, sys.argv[2])
trainer.fit()
rank = trainer.dist.rank
torch.save({n: p.detach().clone() for n, p in trainer.model.named_parameters()}, f"{sys.argv[2]}/rank{rank}.pt")
trainer.close()
"""


def test_routed_ddp_ranks_agree_and_match_one_process(governed, tmp_path):
    from conftest import write_policy

    policy = write_policy(governed, tmp_path / "policy.yaml", [
        {"classes": ["gutenberg/tragedy/macbeth"], "params": ["tok_emb", "blocks.0"], "action": "deny"},
        {"classes": ["*"], "params": ["blocks.1.mlp"], "action": "deny", "phase": "6ba..1000ba"},
    ])
    config = governed.recipe(governance={"policy": str(policy)}, data={"batching": "random"},
                             train={"max_duration": "12ba", "microbatch_size": 2})
    path = write_recipe(tmp_path / "recipe.yaml", config)
    script = tmp_path / "probe.py"
    script.write_text(RANK_PROBE)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", str(script), str(path), str(tmp_path / "ddp")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "ddp" / "rank0.pt"), torch.load(tmp_path / "ddp" / "rank1.pt")
    assert_tree_equal(rank0, rank1, "rank 0 vs rank 1")

    single = Trainer(recipe(config), tmp_path / "single")
    before = {n: p.detach().clone() for n, p in single.model.named_parameters()}
    single.fit()
    after = dict(single.model.named_parameters())
    for name, value in rank0.items():
        torch.testing.assert_close(value, after[name].detach(), rtol=0, atol=2e-5, msg=name)
    frozen_late = [n for n in before if n.startswith("blocks.1.mlp.")]
    assert all(not torch.equal(before[n], after[n]) for n in frozen_late)  # trained during the first 6 batches
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


def test_two_rank_ledger_equals_one_process_ledger(governed, tmp_path):
    """Rank 0 writes one ledger for the global batch: the same examples, contributions and updates as one process."""
    from test_ledger import entries, ledger_recipe

    config = ledger_recipe(governed, data={"batching": "random"}, train={"max_duration": "6ba", "microbatch_size": 2},
                           ledger={"flush_every": 2})
    path = write_recipe(tmp_path / "recipe.yaml", config)
    ddp = torchrun(2, "train", str(path), "--run-dir", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    with Trainer(recipe(config), tmp_path / "single") as single:
        single.fit()
    assert smalti_cli("ledger", "verify", str(tmp_path / "ddp")).returncode == 0

    two, one = entries(tmp_path / "ddp"), entries(tmp_path / "single")
    assert len(two) == len(one) == 7
    assert two[0]["layers"] == one[0]["layers"]
    for a, b in zip(two[1:], one[1:]):
        assert {s: sorted(ids) for s, ids in a["examples"].items()} == {s: sorted(ids) for s, ids in b["examples"].items()}
        assert a["counts"] == b["counts"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert set(a["contributions"]) == set(b["contributions"]) and len(a["contributions"]) > 1
        for signature, cells in b["contributions"].items():
            got = {layer: (norm, share) for layer, norm, share in a["contributions"][signature]}
            assert set(got) == {layer for layer, _, _ in cells}, signature
            for layer, norm, share in cells:
                assert got[layer][0] == pytest.approx(norm, rel=1e-4, abs=1e-7), (a["step"], signature, layer)
                assert got[layer][1] == pytest.approx(share, abs=1e-4), (a["step"], signature, layer)
        for x, y in zip(a["layers"], b["layers"]):
            assert x[0] == y[0]  # updated flag
            assert x[1] == pytest.approx(y[1], rel=1e-3, abs=1e-8) and x[4] == pytest.approx(y[4], rel=1e-5)
