"""The learning-dynamics ledger: written by the trainer, verified from scratch, exact after kill -9."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import write_policy
from helpers import recipe as make_recipe

HAMLET, TEMPEST = "gutenberg/tragedy/hamlet", "gutenberg/comedy/tempest"


def ledger_recipe(governed, **sections):
    governance = {"ledger": {"enabled": True, "key": str(governed.key("trainer")), "entropy_every": 4,
                             "flush_every": 3}}
    governance.update(sections.pop("governance", {}))
    if "ledger" in sections:
        governance["ledger"].update(sections.pop("ledger"))
    return governed.recipe(governance=governance, **sections)


def train(governed, run_dir: Path, **sections):
    from tessera.trainer import Trainer

    trainer = Trainer(make_recipe(ledger_recipe(governed, **sections)), run_dir)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return run_dir


def entries(run_dir: Path) -> list[dict]:
    from tessera.governance.ledger.entry import decode_entry

    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return [decode_entry(row[0]).body for row in db.execute("SELECT data FROM entries ORDER BY idx")]


def test_a_governed_run_writes_one_verifiable_entry_per_step(governed, tmp_path):
    from tessera.governance.keys import PublicKey
    from tessera.governance.ledger.verify import verify_ledger

    run = train(governed, tmp_path / "run", train={"max_duration": "10ba"})
    report = verify_ledger(run, PublicKey.load(governed.keys / "trainer.pub"), deep=True)
    assert report.ok, report.problem
    body = entries(run)
    assert body[0]["kind"] == "run" and [e["step"] for e in body[1:]] == list(range(1, 11))
    assert report.entries == 11 and report.last_head["final"]
    assert all(len(e["examples"]) == 8 for e in body[1:])
    assert sum(body[1]["counts"].values()) == 8
    assert [("entropy" in e) for e in body[1:]] == [s % 4 == 0 for s in range(1, 11)]
