"""Deletion through a lineage: a class an ancestor learned is forgotten from a fine-tune of a fine-tune.

The reference is independent: the chain trained again, from nothing, with the class excluded in every run
(``smalti train`` recipes, no deletion code), compared bitwise with what ``smalti forget`` produced.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import smalti_cli, write_policy
from helpers import latest_payload
from test_ledger import HAMLET, SONNETS, TEMPEST, train

COMEDY, POETRY, TRAGEDY = "gutenberg/comedy", "gutenberg/poetry", "gutenberg/tragedy"
STEPS = {"base": 8, "ft1": 6, "ft2": 4}


def _chain(governed, root: Path, forgotten: str | None = None, **sections) -> dict[str, Path]:
    """base (comedy + poetry) <- ft1 (tragedies) <- ft2 (tragedies); ``forgotten`` excluded from every run."""
    runs: dict[str, Path] = {}
    extra = [forgotten] if forgotten else []
    for name, exclude, parent in (("base", [TRAGEDY], None), ("ft1", [COMEDY, POETRY], "base"),
                                  ("ft2", [COMEDY, POETRY], "ft1")):
        covered = any(forgotten and forgotten.startswith(e + "/") for e in exclude)
        own = sections.get(name, {})
        runs[name] = train(governed, root / name, data={"exclude_classes": exclude + ([] if covered else extra),
                                                        **own.get("data", {})},
                           train={"max_duration": f"{STEPS[name]}ba", **own.get("train", {})},
                           checkpoint={"interval": "3ba", "keep": 4},
                           init={"from_run": str(runs[parent])} if parent else {},
                           model={"dropout": 0.1, **own.get("model", {})},  # dropout on, as users train
                           **{k: v for k, v in own.items() if k not in ("data", "train", "model")})
    return runs


@pytest.fixture(scope="module")
def chain_runs(governed, tmp_path_factory):
    return _chain(governed, tmp_path_factory.mktemp("chain"))


def test_forgetting_what_the_base_learned_from_a_fine_tune_equals_the_chain_trained_without_it(governed, chain_runs,
                                                                                             tmp_path):
    ft2 = chain_runs["ft2"]
    plan = smalti_cli("forget", str(ft2), "--class", TEMPEST, "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert f"learned by an ancestor: {chain_runs['base'].resolve()}" in plan.stdout

    out = tmp_path / "forgotten"
    done = smalti_cli("forget", str(ft2), "--class", TEMPEST, "--out", str(out))
    assert done.returncode == 0, done.stderr
    reference = _chain(governed, tmp_path / "reference", forgotten=TEMPEST)
    new_base, new_ft1 = tmp_path / "forgotten.lineage" / "0-base", tmp_path / "forgotten.lineage" / "1-ft1"
    for made, expected in ((new_base, reference["base"]), (new_ft1, reference["ft1"]), (out, reference["ft2"])):
        got, want = latest_payload(made)["model"], latest_payload(expected)["model"]
        assert got.keys() == want.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), (made.name, name)
    original = latest_payload(ft2)["model"]
    assert not all(torch.equal(original[n], latest_payload(out)["model"][n]) for n in original)  # a control

    certificate = json.loads((out / "deletion-certificate.json").read_text())
    assert [Path(link["original"]["run_dir"]).name for link in certificate["lineage"]] == ["base", "ft1", "ft2"]
    assert [Path(link["replacement"]["run_dir"]) for link in certificate["lineage"]] == [
        new_base.resolve(), new_ft1.resolve(), out.resolve()]
    assert certificate["lineage"][0]["how"].startswith("exact replay after step")
    assert certificate["full_retrain_steps"] == sum(STEPS.values())
    verified = smalti_cli("ledger", "verify", str(out))
    assert verified.returncode == 0, verified.stderr
    assert "deletion certificate OK" in verified.stdout
    assert (f"lineage OK: {out} <- {new_ft1.resolve()} (init) <- {new_base.resolve()} (init) <- "
            f"{chain_runs['base'].resolve()} (replay)") in verified.stdout

    with sqlite3.connect(new_ft1 / "ledger.sqlite") as db:  # one byte of the replaced middle run's ledger
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
        db.execute("UPDATE entries SET data = ? WHERE idx = 2", (data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],))
    failed = smalti_cli("ledger", "verify", str(out))
    assert failed.returncode == 1 and f"the run {new_ft1.resolve()}'s ledger does not verify" in failed.stderr


def test_the_plan_starts_where_the_class_entered_the_lineage(governed, chain_runs, tmp_path):
    from smalti.workflows.lineage_deletion import plan_through_lineage

    assert plan_through_lineage(chain_runs["ft1"], HAMLET) is None  # its parent never saw a tragedy
    assert plan_through_lineage(chain_runs["base"], TEMPEST) is None  # no parent: an ordinary deletion
    through = plan_through_lineage(chain_runs["ft2"], HAMLET)  # ft1 learned it before ft2 did
    assert [run.name for run in through.runs] == ["ft1", "ft2"] and through.contributed == [True, True]
    through = plan_through_lineage(chain_runs["ft2"], SONNETS)  # only the base saw it
    assert [run.name for run in through.runs] == ["base", "ft1", "ft2"] and through.contributed == [True, False, False]


def test_ablation_through_a_lineage_resets_the_adapter_the_ancestor_confined_the_class_to(governed, tmp_path):
    from smalti.workflows.forget import forget
    from smalti.trust.keys import SigningKey

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    adapters = {"model": {"adapters": {"classes": [HAMLET], "hidden": 8}}, "governance": {"policy": str(policy)},
                "train": {"microbatch_size": 2}}
    runs = _chain(governed, tmp_path / "chain",
                  ft1={**adapters, "data": {"batching": "per_class"}},
                  ft2={**adapters, "data": {"batching": "per_class", "exclude_classes": [COMEDY, POETRY, HAMLET]}})
    key = SigningKey.load(governed.key("trainer"))
    with pytest.raises(Exception, match="cannot ablate 'gutenberg/comedy/tempest'.*use --mode exact"):
        forget(runs["ft2"], TEMPEST, tmp_path / "refused", key, mode="ablate")
    out = tmp_path / "ablated"
    certificate = forget(runs["ft2"], HAMLET, out, key, mode="ablate", reset="zero")
    confined = set(certificate["reset"]["parameters"])
    assert confined and all(".adapters." in name for name in confined)
    assert [Path(link["original"]["run_dir"]).name for link in certificate["lineage"]] == ["ft1", "ft2"]
    before, after = latest_payload(runs["ft2"])["model"], latest_payload(out)["model"]
    for name, value in after.items():
        if name in confined:
            assert torch.count_nonzero(value) == 0 and torch.count_nonzero(before[name]) > 0, name
        else:
            assert torch.equal(value, before[name]), name
    verified = smalti_cli("ledger", "verify", str(out))
    assert verified.returncode == 0, verified.stderr
