"""Commands that need no model never import torch (issue 35): a team's whole session replayed in fresh
interpreters, each non-model command under a probe that reports whether torch was ever imported.

The session and the probe are ``benchmarks/cli_startup.py``'s, so the benchmark's fraction and this test
always judge the same commands.
"""

from __future__ import annotations

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from cli_startup import MODEL_COMMANDS, TINY_LLAMA, probe, user_session  # noqa: E402

pytestmark = pytest.mark.slow

RECIPE = {"seed": 3, "model": {"hf": {"config": TINY_LLAMA}}, "data": {"seq_len": 16},
          "train": {"max_duration": "4ba", "global_batch_size": 8, "device": "cpu"},
          "eval": {"interval": "1000000ba", "max_samples": 8}, "checkpoint": {"interval": "4ba", "keep": 1},
          "logging": {"console": False}}


def test_no_command_without_a_model_imports_torch(tiny_corpus, tmp_path):
    outcomes = user_session(tmp_path / "session", tiny_corpus, RECIPE)
    failed = [f"smalti {o.command} (exit {o.returncode}): {o.stderr}" for o in outcomes if o.returncode != 0]
    assert not failed, "\n".join(failed)
    unreported = [o.command for o in outcomes if o.torch is None]
    assert not unreported, f"the probe never reported for: {unreported}"
    importing = sorted({o.command for o in outcomes if o.torch})
    assert not importing, f"these commands imported torch: {importing}"
    probed = {o.command.split()[0] for o in outcomes}
    assert probed.isdisjoint(MODEL_COMMANDS)
    assert {"keys", "taxonomy", "data", "ledger", "audit", "witness", "verify-model", "serve", "auditor",
            "sign", "verify"} <= probed  # the list the issue names, all of it replayed

    # the guard can fail: the same probe on a command that loads the model sees torch
    sampled = probe(["sample", "runs/one", "--prompt", "the", "--tokens", "2"], tmp_path / "session")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.torch is True
