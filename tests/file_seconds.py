"""Regenerate ``tests/file_seconds.json``, each test file's total time, from a pytest log.

The suite deals the longest files out first (``conftest.pytest_collection_modifyitems``), so that under
xdist a long file never starts last and runs alone while the other core idles. Usage::

    .venv/bin/python -m pytest -n 2 --dist loadfile --durations=0 | tee suite.log
    .venv/bin/python tests/file_seconds.py suite.log
"""

from __future__ import annotations

import collections
import json
import re
import sys
from pathlib import Path

LINE = re.compile(r"\s*([\d.]+)s (?:call|setup|teardown)\s+(tests/[^:]+)::")


def file_seconds(log: str) -> dict[str, float]:
    totals: collections.Counter[str] = collections.Counter()
    for line in log.splitlines():
        match = LINE.match(line)
        if match:
            totals[match.group(2)] += float(match.group(1))
    return {name: round(seconds, 1) for name, seconds in sorted(totals.items(), key=lambda kv: -kv[1])}


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/file_seconds.py PYTEST_LOG (a run with --durations=0)")
    totals = file_seconds(Path(sys.argv[1]).read_text(errors="replace"))
    if not totals:
        sys.exit(f"{sys.argv[1]}: no durations found; run pytest with --durations=0")
    out = Path(__file__).with_name("file_seconds.json")
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(totals, indent=1) + "\n")
    tmp.replace(out)
    print(f"{out}: {len(totals)} files, {sum(totals.values()):.0f} s in all")


if __name__ == "__main__":
    main()
