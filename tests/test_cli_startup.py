"""Commands that need no model never import torch (issue 35): a team's whole session replayed in fresh
interpreters, each non-model command under a probe that reports whether torch was ever imported.

The test runs ``benchmarks/cli_startup.py`` itself (it is also that benchmark's smoke test), so the
benchmark's fraction and this guard always judge the same commands.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO
from test_benchmarks import _run

sys.path.insert(0, str(REPO / "benchmarks"))

from cli_startup import MODEL_COMMANDS, probe  # noqa: E402

pytestmark = pytest.mark.slow


def test_no_command_without_a_model_imports_torch(tiny_corpus, tmp_path):
    """The benchmark's own run is the test: every command of the session exits 0 (else the script fails
    naming it) and its probe reported no torch import."""
    session = tmp_path / "session"
    result = _run("cli_startup.py", "--repeats", "1", "--corpus", str(tiny_corpus), "--session", str(session))
    assert result["benchmark"] == "cli_startup" and result["commands"] >= 25
    assert result["torch_free_commands"] == 1.0, f"these commands imported torch: {result['importing_torch']}"
    assert result["importing_torch"] == []
    assert 0 < result["ledger_verify_s"] and result["ratio"] > 1
    probed = set(result["command_families"])
    assert probed.isdisjoint(MODEL_COMMANDS)
    assert {"keys", "taxonomy", "data", "ledger", "audit", "witness", "verify-model", "serve", "auditor",
            "sign", "verify"} <= probed  # the list the issue names, all of it replayed

    # the guard can fail: the same probe on a command that loads the model sees torch
    sampled = probe(["sample", "runs/one", "--prompt", "the", "--tokens", "2"], session)
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.torch is True
