"""Runs that survive a lost worker with no one watching, and multi-node launches, under real torchrun.

A worker is killed with kill -9 mid-run; torchelastic (``--max-restarts``) restarts the group, the run
resumes from its last complete checkpoint, and the result is compared bitwise with an uninterrupted
run: weights, optimizer, RNG, metrics and every ledger entry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, free_port
sys.path.insert(0, str(REPO / "benchmarks"))
from common import torchrun_workers as _workers  # noqa: E402
from helpers import latest_payload  # noqa: E402
from test_faults import _assert_same_run, _latest_name, _recipe  # noqa: E402

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _torchrun(*launch: str, recipe: Path, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "smalti", "train", str(recipe),
            "--run-dir", str(run_dir)]


def _wait(condition, what: str, agent: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        if agent.poll() is not None:
            raise AssertionError(f"torchrun exited ({agent.returncode}) while waiting for {what}: "
                                 f"{agent.stderr.read()[-3000:] if agent.stderr else ''}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _checkpoint_batch(run_dir: Path) -> int:
    name = _latest_name(run_dir)
    return int(name.split("-ba")[1].split(".")[0]) if name else -1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_corpus) -> tuple[Path, Path]:
    """One plain two-rank torchrun of the recipe, the reference both tests compare against (read-only)."""
    root = tmp_path_factory.mktemp("elastic")
    recipe = _recipe(root, tiny_corpus)
    launch = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={free_port()}"]
    reference = subprocess.run(_torchrun(*launch, recipe=recipe, run_dir=root / "reference"),
                               capture_output=True, text=True, env=ENV, cwd=REPO, timeout=900)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return recipe, root / "reference"


def test_torchrun_restarts_workers_killed_mid_run_and_the_run_is_bitwise_identical(tmp_path, uninterrupted):
    recipe, reference = uninterrupted
    run = tmp_path / "elastic"
    elastic = ["--nproc-per-node=2", "--max-restarts=3", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.2"]
    agent = subprocess.Popen(_torchrun(*elastic, recipe=recipe, run_dir=run), env={**ENV, "LOGLEVEL": "INFO"}, cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        killed = []
        for rank in (1, 0):  # a non-zero rank first, then rank 0, in the same run
            _wait(lambda: len(_workers(agent.pid)) == 2 and set(_workers(agent.pid).values()).isdisjoint(killed),
                  f"two fresh workers before killing rank {rank}", agent)
            resumed_at = _checkpoint_batch(run)
            _wait(lambda: _checkpoint_batch(run) > resumed_at, f"a new checkpoint before killing rank {rank}", agent)
            time.sleep(0.15)  # somewhere in the next steps
            victim = _workers(agent.pid)[rank]
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
        _, stderr = agent.communicate(timeout=600)
    finally:
        if agent.poll() is None:
            agent.kill()
    assert agent.returncode == 0, stderr[-3000:]
    assert stderr.count("will restart worker group") == 2, stderr[-3000:]  # torchelastic's own log, at INFO
    assert latest_payload(run)["timestamp"]["batch"] == 240
    _assert_same_run(reference, run)


def test_two_agents_rendezvous_on_loopback_and_match_one_agent(tmp_path, uninterrupted):
    recipe, one_agent = uninterrupted
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
             "--rdzv-id=smalti-test"]
    agents = [subprocess.Popen(_torchrun(*nodes, recipe=recipe, run_dir=tmp_path / "two-agents"), env=ENV, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=900) for agent in agents]
    for agent, (_, stderr) in zip(agents, outputs):
        assert agent.returncode == 0, stderr[-3000:]
    assert sum(out.count("summary") for out, _ in outputs) == 1  # one rank 0 across both nodes
    _assert_same_run(one_agent, tmp_path / "two-agents")
