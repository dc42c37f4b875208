"""elastic_recovery: how long a run is down after a worker dies, under torchrun's own restarts.

A 2-process run of the baby GPT (gloo, CPU) is launched with ``torchrun --max-restarts``; a worker
is killed with kill -9 a moment after a checkpoint, several times in the same run (ranks 1, 0, 1).
torchelastic notices, stops the survivors, restarts the group, and the run resumes from its last
complete checkpoint. Nobody acts.

- ``recovery_s``: seconds from the kill to the next completed step (the step after the resumed
  checkpoint, as ``metrics.jsonl`` shows it), median over the kills. Goal: < 60 on this machine.
- ``steps_lost``: steps that had completed before the kill and were trained again (at most those
  since the last checkpoint), median over the kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import REPO, baby_recipe, emit, free_port, machine, torchrun_workers as workers


def last_batch(metrics: Path) -> int:
    """The newest step in metrics.jsonl (written a line at a time, so it is current)."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return -1
    batches = [json.loads(line)["ba"] for line in lines if line.strip().endswith("}")]
    return batches[-1] if batches else -1


def checkpoint_batch(run: Path) -> int:
    pointer = run / "checkpoints" / "latest"
    return int(pointer.read_text().split("-ba")[1].split(".")[0]) if pointer.exists() else -1


def wait(condition, agent: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if agent.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"torchrun stopped or timed out (exit {agent.poll()})")
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    recoveries, lost = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        recipe = baby_recipe(100_000, checkpoint={"interval": f"{args.checkpoint_every}ba", "keep": 2},
                             logging={"console": False, "interval": "1ba", "jsonl": True})
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe.to_dict()))
        run = root / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--max-restarts={args.kills}",
                   "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--monitor-interval=0.2",
                   "-m", "smalti", "train", str(path), "--run-dir", str(run)]
        agent = subprocess.Popen(command, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed: list[int] = []
        try:
            for kill in range(args.kills):
                rank = (1, 0)[kill % 2]
                wait(lambda: len(workers(agent.pid)) == 2 and set(workers(agent.pid).values()).isdisjoint(killed), agent)
                resumed_at = checkpoint_batch(run)
                wait(lambda: checkpoint_batch(run) > resumed_at, agent)
                time.sleep(rng.uniform(0.1, 0.6))  # somewhere between two checkpoints
                checkpoint, done_before = checkpoint_batch(run), last_batch(run / "metrics.jsonl")
                victim = workers(agent.pid)[rank]
                os.kill(victim, signal.SIGKILL)
                killed_at = time.perf_counter()
                killed.append(victim)
                wait(lambda: len(workers(agent.pid)) == 2 and set(workers(agent.pid).values()).isdisjoint(killed), agent)
                restarted = time.time()
                # The resumed rank 0 cuts metrics.jsonl back to the checkpoint, then appends each step.
                wait(lambda: (run / "metrics.jsonl").stat().st_mtime > restarted
                     and last_batch(run / "metrics.jsonl") > checkpoint, agent)
                recoveries.append(time.perf_counter() - killed_at)
                lost.append(max(0, done_before - checkpoint))
        finally:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                agent.kill()
    emit({
        "benchmark": "elastic_recovery",
        "recovery_s": round(statistics.median(recoveries), 2),
        "goal": "< 60",
        "steps_lost": statistics.median(lost),
        "checkpoint_every": args.checkpoint_every,
        "per_kill_recovery_s": [round(r, 2) for r in recoveries],
        "per_kill_steps_lost": lost,
        "kills": args.kills,
        "launcher": "torchrun --nproc-per-node 2 --max-restarts K (c10d rendezvous, gloo)",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
