"""The command line's OpenMP wait policy: set before torch loads, never over the user's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

PROBE = """
import json, os, sys
{before}
from smalti.cli.main import main
try:
    main(["--version"])
except SystemExit:
    pass
loaded_before = "torch" in sys.modules
import torch  # what libgomp will read, now that torch loads
print(json.dumps({{"policy": os.environ.get("OMP_WAIT_POLICY"), "spin": os.environ.get("GOMP_SPINCOUNT"),
                  "torch_loaded_by_the_cli": loaded_before}}))
"""


def _probe(env_changes: dict[str, str | None], before: str = "") -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    done = subprocess.run([sys.executable, "-c", PROBE.format(before=before)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_command_line_makes_idle_threads_sleep_before_torch_loads():
    assert _probe({}) == {"policy": "PASSIVE", "spin": None, "torch_loaded_by_the_cli": False}


@pytest.mark.parametrize("variable, value", [("OMP_WAIT_POLICY", "ACTIVE"), ("OMP_WAIT_POLICY", "passive"),
                                             ("GOMP_SPINCOUNT", "300000")])
def test_a_policy_the_user_chose_is_kept(variable, value):
    found = _probe({variable: value})
    assert found["policy" if variable == "OMP_WAIT_POLICY" else "spin"] == value
    if variable == "GOMP_SPINCOUNT":
        assert found["policy"] is None  # the spin count alone decides, as libgomp documents


def test_nothing_is_set_once_torch_is_loaded():
    """Too late for libgomp to read it: changing the environment then would only mislead."""
    assert _probe({}, before="import torch")["policy"] is None
