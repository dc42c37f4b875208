"""noisy_neighbour: training throughput beside one CPU-bound process, over the same training alone.

The demo's model and batch (4 layers, width 128, context 64, batch 32) train for
``--steps`` steps in a fresh process, once alone and once while a plain Python
busy loop (started and stopped here) holds one core. Two thread policies, each
measured the same way in the same run, alternating, for ``--rounds`` rounds:

- ``smalti``: what ``smalti train`` does (``smalti.threads``: it looks at the machine
  before torch loads; beside a busy process idle OpenMP workers sleep at once,
  ``OMP_WAIT_POLICY=PASSIVE``, on a quiet machine torch's default stands);
- ``torch``: torch's own default (workers spin before they sleep).

``ratio`` is the smalti policy's throughput beside the neighbour over its throughput
alone (goal >= 0.4; the fair share of 2 cores is 0.5); ``baseline_ratio`` is the same
for torch's default; ``quiet_cost`` is how much slower a step is alone under the
smalti policy than under torch's (1.0: a quiet machine keeps full speed);
``passive_quiet_cost`` is what always-passive waiting would cost there (measured
too, the reason the policy is chosen per machine). Medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def child(steps: int, smalti_policy: bool) -> None:
    """One measurement: median step time of a short training run (after its first steps)."""
    sys.path.insert(0, str(HERE.parent))
    if smalti_policy:
        from smalti.threads import apply_thread_defaults

        apply_thread_defaults()  # before anything imports torch, as the command line does
    import tempfile

    from common import baby_recipe

    from smalti.core.callback import Callback
    from smalti.trainer import Trainer

    class StepTimes(Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.last: float | None = None

        def batch_end(self, state, logger) -> None:
            now = time.perf_counter()
            if self.last is not None:
                self.times.append(now - self.last)
            self.last = now

    timer = StepTimes()
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(baby_recipe(steps, batch_size=32), run_dir, callbacks=[timer]).fit()
    import torch

    print(json.dumps({"step_ms": 1000 * statistics.median(timer.times[3:]), "threads": torch.get_num_threads(),
                      "policy": os.environ.get("OMP_WAIT_POLICY", "torch default")}))


def measure(steps: int, smalti_policy: bool, extra_env: dict[str, str] | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARIABLES}
    env.update(extra_env or {})
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--steps", str(steps)]
    if smalti_policy:
        command.append("--smalti-policy")
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_neighbour() -> subprocess.Popen:
    """A plain CPU-bound Python loop: one core, never sleeping."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smalti-policy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.smalti_policy)
        return

    results: dict[str, dict[str, list[float]]] = {p: {"alone": [], "beside": []} for p in ("smalti", "torch")}
    chosen: dict[str, set[str]] = {"alone": set(), "beside": set()}
    passive_alone: list[float] = []
    threads = None
    for _ in range(args.rounds):
        passive_alone.append(measure(args.steps, False, {"OMP_WAIT_POLICY": "PASSIVE"})["step_ms"])
        for policy in ("smalti", "torch"):
            alone = measure(args.steps, policy == "smalti")
            neighbour = busy_neighbour()
            try:
                time.sleep(0.5)
                beside = measure(args.steps, policy == "smalti")
            finally:
                neighbour.kill()
                neighbour.wait()
            results[policy]["alone"].append(alone["step_ms"])
            results[policy]["beside"].append(beside["step_ms"])
            threads = alone["threads"]
            if policy == "smalti":
                chosen["alone"].add(alone["policy"])
                chosen["beside"].add(beside["policy"])

    median = statistics.median
    ratios = {p: [a / b for a, b in zip(r["alone"], r["beside"])] for p, r in results.items()}
    sys.path.insert(0, str(HERE))
    from common import emit, machine

    emit({
        "benchmark": "noisy_neighbour",
        "ratio": round(median(ratios["smalti"]), 3),
        "goal": ">= 0.4",
        "baseline_ratio": round(median(ratios["torch"]), 3),
        "quiet_cost": round(median(results["smalti"]["alone"]) / median(results["torch"]["alone"]), 3),
        "passive_quiet_cost": round(median(passive_alone) / median(results["torch"]["alone"]), 3),
        "smalti_chose": {k: sorted(v) for k, v in chosen.items()},
        "step_ms_median": {p: {k: round(median(v), 1) for k, v in r.items()} for p, r in results.items()},
        "per_round_ratios": {p: [round(x, 3) for x in v] for p, v in ratios.items()},
        "steps": args.steps,
        "rounds": args.rounds,
        "torch_threads": threads,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
