"""Lineage: fine-tunes that start from a parent's signed final weights, chains of them, and links that fail closed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from smalti.checkpoint import weights_sha256
from smalti.governance.lineage import chain

from conftest import smalti_cli, write_recipe
from helpers import latest_payload

COMEDY, POETRY, TRAGEDY = "gutenberg/comedy", "gutenberg/poetry", "gutenberg/tragedy"


def _config(governed, root: Path, exclude: list[str], steps: int, **sections) -> Path:
    ledger = {"enabled": True, "key": str(governed.key("trainer")), "entropy_every": 0}
    config = governed.recipe(data={"exclude_classes": exclude}, train={"max_duration": f"{steps}ba"},
                             checkpoint={"interval": "4ba", "keep": 3}, governance={"ledger": ledger}, **sections)
    return write_recipe(root / f"{root.name}.yaml", config)


def _train(recipe: Path, run: Path, *extra: str):
    return smalti_cli("train", str(recipe), "--run-dir", str(run), *extra)


@pytest.fixture(scope="module")
def three(governed, tmp_path_factory):
    """base (comedy + poetry) <- ft1 (tragedies, from base) <- ft2 (tragedies again, from ft1)."""
    root = tmp_path_factory.mktemp("lineage")
    runs = {}
    base = _train(_config(governed, root, [TRAGEDY], 8), root / "base")
    assert base.returncode == 0, base.stderr
    runs["base"] = root / "base"
    for name, parent in (("ft1", "base"), ("ft2", "ft1")):
        done = _train(_config(governed, root, [COMEDY, POETRY], 6), root / name, "--init-from", str(runs[parent]))
        assert done.returncode == 0, done.stderr
        runs[name] = root / name
    return runs


def _genesis(run: Path) -> dict:
    from smalti.governance.lineage import run_entry

    return run_entry(run)


def test_a_fine_tune_names_its_parent_and_starts_from_its_signed_final_weights(three):
    base, ft1, ft2 = three["base"], three["ft1"], three["ft2"]
    link = _genesis(ft1)["parent"]
    assert link["kind"] == "init" and Path(link["run_dir"]) == base.resolve()
    base_final = latest_payload(base)
    assert link["head"] == base_final["ledger"]["head"] and link["head"]["final"]
    assert link["start_weights_sha256"] == weights_sha256(base_final["model"]) == link["head"]["weights"]
    assert link["fingerprints"] == _genesis(base)["fingerprints"] and link["trainer_key"].startswith("ed25519:")
    assert [p.name for p, _ in chain(ft2)] == ["ft1", "base"]  # any depth
    # Weights only: the fine-tune's optimizer and data order are its own.
    first = json.loads((ft1 / "metrics.jsonl").read_text().splitlines()[0])
    assert first["ba"] == 1
    verified = smalti_cli("ledger", "verify", str(ft2))
    assert verified.returncode == 0, verified.stderr
    assert f"lineage OK: {ft2} <- {ft1.resolve()} (init) <- {base.resolve()} (init)" in verified.stdout


def test_audits_answer_for_the_run_and_mark_what_is_inherited(three):
    answer = json.loads(smalti_cli("audit", str(three["ft2"]), "--class", COMEDY, "--json").stdout)
    assert answer["examples_seen"] == 0 and not answer["layers_touched"]  # ft2 never saw a comedy
    ft1, base = answer["inherited"]
    assert ft1["run_dir"] == str(three["ft1"].resolve()) and not ft1["answer"]["layers_touched"]
    assert base["run_dir"] == str(three["base"].resolve()) and base["link"] == "init"
    assert base["answer"]["examples_seen"] > 0 and "tok_emb" in base["answer"]["layers_touched"]
    text = smalti_cli("audit", str(three["ft2"]), "--layer", "tok_emb").stdout
    assert f"inherited from {three['base'].resolve()} (init link" in text and COMEDY + "/tempest" in text


def _copy(runs: dict, tmp_path: Path) -> dict:
    """A private copy of the chain, the links rewritten to point into it (what moving the runs would do)."""
    copies = {}
    for name, run in runs.items():
        shutil.copytree(run, tmp_path / name)
        copies[name] = tmp_path / name
    return copies


def test_a_tampered_parent_ledger_stops_the_fine_tune_and_fails_the_child(governed, three, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(three["base"], base)
    with sqlite3.connect(base / "ledger.sqlite") as db:  # one byte of the parent's third entry
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
        db.execute("UPDATE entries SET data = ? WHERE idx = 2", (data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],))
    refused = _train(_config(governed, tmp_path, [COMEDY, POETRY], 2), tmp_path / "child", "--init-from", str(base))
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert f"init.from_run {base}: its ledger does not verify" in refused.stderr
    assert not (tmp_path / "child").exists()


def _tamper_ledger_of(run: Path) -> None:
    with sqlite3.connect(run / "ledger.sqlite") as db:
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 3").fetchone()
        db.execute("UPDATE entries SET data = ? WHERE idx = 3", (data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],))


def _resign_final_head(run: Path, key_path: Path) -> None:
    """What a parent's operator could do with its key: sign the same final tree again, a second later."""
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.store import LedgerStore

    store = LedgerStore(run / "ledger.sqlite")
    head = store.heads()[-1]
    store.close()
    stamp = head.timestamp  # ISO 8601, seconds at [17:19]
    head = dataclasses.replace(head, timestamp=f"{stamp[:17]}{(int(stamp[17:19]) + 1) % 60:02d}{stamp[19:]}")
    signature = SigningKey.load(key_path).sign(head.message())
    with sqlite3.connect(run / "ledger.sqlite") as db:
        db.execute("UPDATE heads SET timestamp = ?, signature = ? WHERE size = ?", (head.timestamp, signature, head.size))


def test_ledger_verify_names_the_bad_link(governed, three, tmp_path):
    base, ft1 = Path(_genesis(three["ft1"])["parent"]["run_dir"]), three["ft1"]
    backup = tmp_path / "backup"
    shutil.copytree(base, backup)
    try:
        _tamper_ledger_of(base)  # the parent's ledger no longer verifies
        failed = smalti_cli("ledger", "verify", str(ft1))
        assert failed.returncode == 1 and "lineage FAILED verification" in failed.stderr
        assert f"its parent {base}: its ledger does not verify" in failed.stderr
        shutil.rmtree(base)
        shutil.copytree(backup, base)
        payload_path = base / "checkpoints" / (base / "checkpoints" / "latest").read_text().strip()
        payload = torch.load(payload_path, weights_only=True)
        payload["model"]["tok_emb.weight"] += 1e-3  # the parent's final weights swapped after the child started
        torch.save(payload, payload_path)
        payload_path.with_name(payload_path.name + ".sha256").unlink()
        failed = smalti_cli("ledger", "verify", str(ft1))
        assert failed.returncode == 1 and "at the head the child names no longer holds the weights that head signs" \
            in failed.stderr
        shutil.rmtree(base)
        shutil.copytree(backup, base)
        _resign_final_head(base, governed.key("trainer"))  # still a valid ledger, but not the head the child names
        failed = smalti_cli("ledger", "verify", str(ft1))
        assert failed.returncode == 1 and "does not hold the signed tree head the child names" in failed.stderr
        shutil.rmtree(base)
        shutil.copytree(three["ft2"], base)  # ft2 (whose grandparent is base) put in base's place: a loop
        failed = smalti_cli("ledger", "verify", str(ft1))
        assert failed.returncode == 1 and "its lineage runs in a circle" in failed.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(backup, base)
    assert smalti_cli("ledger", "verify", str(ft1)).returncode == 0


def test_a_parent_whose_weights_are_not_its_signed_ones_is_refused(governed, three, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(three["base"], base)
    path = base / "checkpoints" / (base / "checkpoints" / "latest").read_text().strip()
    payload = torch.load(path, weights_only=True)
    payload["model"]["ln_f.weight"] *= 2
    torch.save(payload, path)
    path.with_name(path.name + ".sha256").unlink()
    refused = _train(_config(governed, tmp_path, [COMEDY, POETRY], 2), tmp_path / "child", "--init-from", str(base))
    assert refused.returncode != 0 and "is not the checkpoint its final signed head names" in refused.stderr


def test_a_parent_signed_by_an_untrusted_key_is_refused(governed, three, tmp_path):
    from smalti.trust.keys import write_key_pair

    _, other = write_key_pair("someone-else", tmp_path / "keys")
    recipe = _config(governed, tmp_path, [COMEDY, POETRY], 2, init={"trust": str(other)})
    refused = _train(recipe, tmp_path / "child", "--init-from", str(three["base"]))
    assert refused.returncode != 0 and "which is not trusted" in refused.stderr and "init.trust" in refused.stderr
    unfinished = tmp_path / "unfinished"
    shutil.copytree(three["base"], unfinished)
    with sqlite3.connect(unfinished / "ledger.sqlite") as db:
        db.execute("UPDATE heads SET final = 0")  # the signature no longer verifies either way
    refused = _train(_config(governed, tmp_path, [COMEDY, POETRY], 2), tmp_path / "child2", "--init-from", str(unfinished))
    assert refused.returncode != 0 and "does not verify" in refused.stderr


def test_a_fine_tune_needs_its_own_ledger_and_load_path_to_other_data_is_one_line(governed, three, tmp_path):
    config = json.loads(json.dumps(governed.recipe(train={"max_duration": "2ba"})))
    path = write_recipe(tmp_path / "r.yaml", config)
    refused = _train(path, tmp_path / "child", "--init-from", str(three["base"]))
    assert refused.returncode != 0 and "init.from_run needs governance.ledger" in refused.stderr
    checkpoint = three["base"] / "checkpoints" / (three["base"] / "checkpoints" / "latest").read_text().strip()
    other = write_recipe(tmp_path / "o.yaml", governed.recipe(seed=4, train={"max_duration": "2ba"},
                                                               checkpoint={"load_path": str(checkpoint)}))
    refused = _train(other, tmp_path / "loaded")
    assert refused.returncode != 0 and len(refused.stderr.strip().splitlines()) == 1
    assert "use --init-from its run" in refused.stderr and "Traceback" not in refused.stderr


def test_a_parent_that_trains_on_after_a_child_started_from_it_leaves_the_link_intact(governed, tmp_path):
    """The train summary invites it ("raise train.max_duration to train on"): the link is checked against the
    parent's checkpoint at the head the child names, not its latest; once that one is pruned, against the digest
    the signed head carries, with a note."""
    recipe = _config(governed, tmp_path, [TRAGEDY], 8)
    base, child = tmp_path / "base", tmp_path / "child"
    assert _train(recipe, base).returncode == 0
    (tmp_path / "ft").mkdir()
    done = _train(_config(governed, tmp_path / "ft", [COMEDY, POETRY], 2), child, "--init-from", str(base))
    assert done.returncode == 0, done.stderr
    trainer = str(governed.keys / "trainer.pub")
    for steps, note in ((12, False), (20, True)):  # keep 3 at every 4: ep0-ba8 is kept at 12, pruned by 20
        more = _train(recipe, base, "--set", f"train.max_duration={steps}ba")
        assert more.returncode == 0, more.stderr
        verified = smalti_cli("ledger", "verify", str(child), "--pubkey", trainer)
        assert verified.returncode == 0, verified.stderr
        assert "lineage OK" in verified.stdout
        assert ("has trained on since the head its child names" in verified.stdout) == note, verified.stdout
        audited = smalti_cli("audit", str(child), "--class", "gutenberg/comedy", "--pubkey", trainer)
        assert audited.returncode == 0, audited.stderr
    weights = base / "checkpoints" / "ep0-ba20.pt"
    assert weights.is_file() and not (base / "checkpoints" / "ep0-ba8.pt").exists()
