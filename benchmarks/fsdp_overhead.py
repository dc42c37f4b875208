"""fsdp_overhead: per-step time of FSDP2 against DDP, 2 gloo ranks on the CPU, the baby GPT.

Informative only: gloo on a 2-core CPU is not the production path (NCCL on GPUs, where FSDP2
overlaps its all-gathers and reduce-scatters with compute). Each measurement is one torchrun of
2 workers; the two modes alternate, and each worker times every step after a warm-up with a
callback (``--worker``), so start-up is not counted.

- ``ratio``: median FSDP2 step time / median DDP step time (each the median over its runs of the
  median step). ``governed_ratio``: the same with a routing policy's worth of governance on (the
  ledger), FSDP2 against DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from common import REPO, baby_recipe, emit, free_port, machine
from smalti.core.callback import Callback


class StepTimes(Callback):
    """Worker side: the wall time of each step (only these two events are handled: nothing else is timed)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def batch_start(self, state, logger) -> None:
        self._start = time.perf_counter()

    def batch_end(self, state, logger) -> None:
        self.times.append(time.perf_counter() - self._start)


def worker(recipe_path: str, run_dir: str, out: str, warmup: int) -> None:
    from smalti.config import load_recipe
    from smalti.trainer import Trainer

    timer = StepTimes()
    trainer = Trainer(load_recipe(recipe_path), run_dir, callbacks=[timer])
    try:
        trainer.fit()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        Path(out).write_text(json.dumps(statistics.median(timer.times[warmup:])))


def one_run(root: Path, mode: str, governed: bool, steps: int, warmup: int, tag: str) -> float:
    sections = {"train": {"max_duration": f"{steps}ba", "global_batch_size": 12, "parallelism": mode, "device": "cpu"}}
    recipe = baby_recipe(steps, **sections)
    data = recipe.to_dict()
    if governed:
        data["governance"] = {"ledger": {"enabled": True, "key": str(root / "trainer.key")}}
    path = root / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    out = root / f"{tag}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", __file__, "--worker", str(path), str(root / tag), str(out), str(warmup)]
    subprocess.run(command, cwd=REPO / "benchmarks", check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return float(json.loads(out.read_text()))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(*sys.argv[2:5], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times: dict[str, list[float]] = {f"{m}{g}": [] for m in ("ddp", "fsdp") for g in ("", "+ledger")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from smalti.trust.keys import write_key_pair

        write_key_pair("trainer", root)
        for repeat in range(args.repeats):
            for key in times:
                mode, governed = key.split("+")[0], key.endswith("+ledger")
                times[key].append(one_run(root, mode, governed, args.steps, args.warmup, f"{key}-{repeat}"))
    median = {k: statistics.median(v) for k, v in times.items()}
    emit({
        "benchmark": "fsdp_overhead",
        "ratio": round(median["fsdp"] / median["ddp"], 3),
        "governed_ratio": round(median["fsdp+ledger"] / median["ddp+ledger"], 3),
        "step_ms": {k: round(1000 * v, 1) for k, v in median.items()},
        "per_run_step_ms": {k: [round(1000 * t, 1) for t in v] for k, v in times.items()},
        "steps": args.steps,
        "ranks": 2,
        "note": "gloo on CPU: informative, not the production path",
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
