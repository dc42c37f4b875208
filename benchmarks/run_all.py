"""Run every benchmark in turn; each prints its own JSON line."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["trainer_overhead.py", "shakespeare_quality.py", "data_throughput.py", "routing_overhead.py", "optimizer_matrix.py", "moe_governance_overhead.py", "ledger_overhead.py",
              "ledger_verify.py", "ledger_publish.py", "tiles_verify.py", "cli_startup.py", "deletion_cost.py", "deletion_tradeoff.py", "time_to_quality_gpt.py", "time_to_quality_vision.py",
              "algorithm_pareto.py", "noisy_neighbour.py", "hf_trainer_overhead.py", "hf_governance_overhead.py", "elastic_recovery.py", "fsdp_overhead.py", "serve_load.py", "forget_quality.py", "demo.py"]

failed = [name for name in BENCHMARKS if subprocess.call([sys.executable, str(HERE / name)]) != 0]
sys.exit(1 if failed else 0)
