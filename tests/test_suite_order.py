"""The suite deals its longest files out first (conftest), from a table ``tests/file_seconds.py`` remakes."""

from __future__ import annotations

import subprocess
import sys

from conftest import FILE_SECONDS, REPO
from file_seconds import file_seconds

LOG = """
============================== slowest durations ===============================
90.40s call     tests/test_a.py::test_one
2.50s setup    tests/test_a.py::test_two
1.25s teardown tests/test_b.py::test_three[x-y]
0.01s call     tests/test_b.py::test_four
(2 durations < 0.005s hidden.  Use -vv to show these durations.)
"""


def test_the_table_is_each_file_s_total_longest_first():
    assert list(file_seconds(LOG).items()) == [("tests/test_a.py", 92.9), ("tests/test_b.py", 1.3)]


def test_every_file_in_the_table_exists_and_collection_puts_the_longest_first():
    assert all((REPO / name).is_file() for name in FILE_SECONDS), "remake tests/file_seconds.json"
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:xdist",
                                "tests/test_threads.py", "tests/test_fsdp.py", "tests/test_seam.py"],
                               capture_output=True, text=True, cwd=REPO, timeout=300)
    files = list(dict.fromkeys(line.split("::")[0] for line in collected.stdout.splitlines() if "::" in line))
    assert files == ["tests/test_fsdp.py", "tests/test_threads.py", "tests/test_seam.py"], collected.stdout[-2000:]
