"""DDP under real torchrun with 2 gloo processes on CPU."""

import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO, tessera_cli, tiny_recipe, write_recipe
from helpers import eval_losses, latest_payload, losses

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "tessera", *args,
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
    single = tessera_cli("train", str(recipe), "--run-dir", str(tmp_path / "single"))
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
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["checkpoints", "metrics.jsonl", "recipe.yaml", "vocab.json"]


def test_ddp_run_resumes_after_the_job_is_restarted(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "16ba"}, checkpoint={"interval": "4ba"})
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    first = torchrun(2, "train", str(recipe), "--run-dir", str(tmp_path / "run"), "--set", "train.max_duration=8ba")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(2, "train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert [b for b, _ in losses(tmp_path / "run")] == list(range(1, 17))
    assert latest_payload(tmp_path / "run")["timestamp"]["batch"] == 16
