"""fsdp_overhead: per-step time of FSDP2 against DDP, 2 gloo ranks on the CPU, the baby GPT.

Informative only: gloo on a 2-core CPU is not the production path (NCCL on GPUs, where FSDP2
overlaps its all-gathers and reduce-scatters with compute). One torchrun of 2 workers trains every
measurement in turn, one Trainer after another in the same process group (``--worker``): the modes
alternate, their order reverses from one repeat to the next, and each worker times every step after
a warm-up with a callback, so neither start-up nor the first run's cold caches are counted.

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


def worker(plan_path: str, out: str, warmup: int) -> None:
    import torch.distributed as dist

    from smalti.config import load_recipe
    from smalti.trainer import Trainer

    dist.init_process_group("gloo")  # joined by every Trainer below, so none of them tears it down
    medians: dict[str, float] = {}
    for tag, recipe_path, run_dir in json.loads(Path(plan_path).read_text()):
        timer = StepTimes()
        trainer = Trainer(load_recipe(recipe_path), run_dir, callbacks=[timer])
        try:
            trainer.fit()
        finally:
            trainer.close()
        medians[tag] = statistics.median(timer.times[warmup:])
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(medians))
    dist.destroy_process_group()


def write_recipe(root: Path, mode: str, governed: bool, steps: int, tag: str) -> Path:
    sections = {"train": {"max_duration": f"{steps}ba", "global_batch_size": 12, "parallelism": mode, "device": "cpu"}}
    data = baby_recipe(steps, **sections).to_dict()
    if governed:
        data["governance"] = {"ledger": {"enabled": True, "key": str(root / "trainer.key")}}
    path = root / f"{tag}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_all(root: Path, keys: list[str], steps: int, warmup: int, repeats: int) -> dict[str, list[float]]:
    """One torchrun for every measurement: the start-up of 2 workers is paid once, not per run."""
    plan = []
    for repeat in range(repeats):
        for key in keys if repeat % 2 == 0 else keys[::-1]:
            tag = f"{key}-{repeat}"
            path = write_recipe(root, key.split("+")[0], key.endswith("+ledger"), steps, tag)
            plan.append((tag, str(path), str(root / tag)))
    (root / "plan.json").write_text(json.dumps(plan))
    out = root / "step-times.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", __file__, "--worker", str(root / "plan.json"), str(out), str(warmup)]
    subprocess.run(command, cwd=REPO / "benchmarks", check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    medians = json.loads(out.read_text())
    return {key: [float(medians[f"{key}-{repeat}"]) for repeat in range(repeats)] for key in keys}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    keys = [f"{m}{g}" for m in ("ddp", "fsdp") for g in ("", "+ledger")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        from smalti.trust.keys import write_key_pair

        write_key_pair("trainer", root)
        times = run_all(root, keys, args.steps, args.warmup, args.repeats)
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
