"""demo: how long `make demo` takes from a fresh clone, and what it prints, written down once for the docs.

Clones the repository (its committed HEAD) into a temporary folder with ../shared beside it,
as CI does, then times `make .venv/.core-installed` (creating the virtual environment and
installing Smalti) and `make demo` (every demo step) separately. Run it on a quiet machine:
another busy process changes the time (docs/architecture.md, threads).

Writes ``docs/demo.json``: the total and its two parts, the final evaluation loss, the demo's
first sample, the machine. README.md, docs/benchmarks.md and the demo recipe quote these
figures, and ``tests/test_docs.py`` checks that they quote the current ones.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIGURES = REPO / "docs" / "demo.json"


def _timed(command: list[str], cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"demo: {' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return seconds, done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help="print the JSON line only; leave docs/demo.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        subprocess.run(["git", "clone", "-q", str(REPO), str(root / "main")], check=True)
        shared = REPO.parent / "shared"
        if shared.exists():
            (root / "shared").symlink_to(shared)
        clone = root / "main"
        install, _ = _timed(["make", ".venv/.core-installed"], clone)
        demo, output = _timed(["make", "demo"], clone)
        shutil.rmtree(clone / ".venv", ignore_errors=True)

    final = re.findall(r"\[ep0 ba(\d+)\] eval/loss (\d+\.\d+)", output)
    if not final:
        sys.exit("demo: found no evaluation line in the demo's output")
    sample = output.split('--prompt "ROMEO:"', 1)[1].split("\n", 1)[1]
    first_lines = [line for line in sample.splitlines()[:3]]
    sys.path.insert(0, str(HERE))
    from common import emit, machine

    figures = {
        "benchmark": "demo",
        "seconds_total": round(install + demo, 1),
        "seconds_install": round(install, 1),
        "seconds_demo": round(demo, 1),
        "minutes_total": round((install + demo) / 60, 1),
        "final_eval": {"batch": int(final[-1][0]), "loss": final[-1][1]},
        "sample_first_lines": first_lines,
        "commit": commit,
        "machine": machine(),
    }
    if not args.no_write:
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    emit(figures)


if __name__ == "__main__":
    main()
