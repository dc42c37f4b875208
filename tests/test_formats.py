"""Every file Smalti writes names its format; a file that names an older one is refused in one line, naming it.

The older identifiers here are the current ones with another project prefix (or, where an older
file held a bare number or nothing, that): the rule reads any identifier but the current one as
older, so no earlier project name needs to appear in the code.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from smalti import formats
from smalti.data.manifest import canonical_json
from smalti.trust.keys import SigningKey, sign_bytes

from conftest import smalti_cli
from test_ledger import TEMPEST, train


def older(identifier: str) -> str:
    return identifier.replace("smalti-", "older-")


def _one_line_naming(result, path: Path, what: str = "written by an older format") -> str:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(path) in lines[0] and what in lines[0], lines[0]
    return lines[0]


def test_the_rule_names_older_newer_and_absent_identifiers():
    assert formats.format_problem(formats.LEDGER, formats.LEDGER, "x") is None
    assert "written by an older format" in formats.format_problem(older(formats.LEDGER), formats.LEDGER, "x")
    assert "written by an older format" in formats.format_problem("2", formats.LEDGER, "x")  # a bare number
    assert "names no format" in formats.format_problem(None, formats.LEDGER, "x")
    assert "smalti-ledger/1" not in formats.format_problem("smalti-ledger/1", formats.LEDGER, "x").split("reads")[1]
    assert "older" in formats.format_problem("smalti-ledger/1", formats.LEDGER, "x")
    newer = formats.format_problem("smalti-ledger/4", formats.LEDGER, "f.sqlite")
    assert newer.startswith("f.sqlite: written by a newer format") and "upgrade" in newer
    assert "older" in formats.format_problem("smalti-dataset/3", formats.LEDGER, "x")  # another kind is not newer


def test_every_identifier_is_a_current_smalti_one():
    names = [v for k, v in vars(formats).items() if k.isupper() and isinstance(v, str) and not k.startswith("_")]
    assert len(names) == 6 and len(set(names)) == 6
    assert all(formats._IDENTIFIER.match(name) and name.startswith("smalti-") for name in names)


@pytest.fixture(scope="module")
def forked(governed, tmp_path_factory):
    """A governed run with a ledger and checkpoints, and the exact-forget fork of it (lineage.json, certificate)."""
    root = tmp_path_factory.mktemp("formats")
    run = train(governed, root / "run", train={"max_duration": "8ba"}, checkpoint={"interval": "4ba", "keep": 2})
    out = root / "forked"
    done = smalti_cli("forget", str(run), "--class", TEMPEST, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return run, out


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    return copy


def test_what_is_written_names_the_current_formats(forked, governed):
    run, out = forked
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert torch.load(run / "checkpoints" / latest, weights_only=True)["format"] == formats.CHECKPOINT
    with sqlite3.connect(run / "ledger.sqlite") as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()[0] == formats.LEDGER
    assert json.loads((out / "lineage.json").read_text())["format"] == formats.LINEAGE
    assert json.loads((out / "deletion-certificate.json").read_text())["version"] == formats.DELETION_CERTIFICATE
    assert json.loads((governed.dataset / "manifest.json").read_text())["format"] == formats.DATASET
    proof = smalti_cli("ledger", "proof", str(run), "--step", "1")
    assert proof.returncode == 0, proof.stderr
    assert f"smalti-format {formats.TREE_HEAD}\n" in json.loads(proof.stdout)["tree_head"]["message"]


def test_an_older_checkpoint_is_refused_in_one_line(forked, tmp_path):
    run = _copy(forked[0], tmp_path)
    path = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    payload = torch.load(path, weights_only=True)
    payload["format"] = 1  # what checkpoints held before they named their format
    torch.save(payload, path)
    path.with_name(path.name + ".sha256").unlink()
    _one_line_naming(smalti_cli("eval", str(run)), path)
    _one_line_naming(smalti_cli("train", str(run / "recipe.yaml"), "--run-dir", str(run)), path)


def test_an_older_ledger_is_refused_in_one_line(forked, tmp_path):
    run = _copy(forked[0], tmp_path)
    for identifier in ("2", older(formats.LEDGER)):
        with sqlite3.connect(run / "ledger.sqlite") as db:
            db.execute("UPDATE meta SET value = ? WHERE key = 'format'", (identifier,))
        line = _one_line_naming(smalti_cli("ledger", "verify", str(run)), run / "ledger.sqlite")
        assert repr(identifier) in line
        _one_line_naming(smalti_cli("audit", str(run), "--layer", "tok_emb"), run / "ledger.sqlite")


def test_an_older_dataset_manifest_is_refused_in_one_line(governed_copy):
    manifest_path = governed_copy.dataset / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format"] = older(formats.DATASET)
    raw = canonical_json(manifest)  # re-signed by the real tagger: only the identifier is old
    manifest_path.write_bytes(raw)
    (governed_copy.dataset / "manifest.json.sig").write_text(sign_bytes(raw, SigningKey.load(governed_copy.key("tagger"))).to_json())
    _one_line_naming(smalti_cli("data", "verify", str(governed_copy.dataset), "--taxonomy", str(governed_copy.taxonomy),
                                "--trust", str(governed_copy.trust)), manifest_path)


def test_an_older_certificate_and_lineage_are_refused_in_one_line(forked, tmp_path):
    parent, out = forked
    out = _copy(out, tmp_path)
    certificate_path = out / "deletion-certificate.json"
    certificate = json.loads(certificate_path.read_text())
    certificate["version"] = older(formats.DELETION_CERTIFICATE)
    certificate_path.write_text(json.dumps(certificate))
    _one_line_naming(smalti_cli("ledger", "verify", str(out)), certificate_path)

    lineage_path = out / "lineage.json"
    lineage = json.loads(lineage_path.read_text())
    del lineage["format"]  # as a deletion's parent link was written before it named its format
    lineage_path.write_text(json.dumps(lineage))
    line = _one_line_naming(smalti_cli("train", str(out / "recipe.yaml"), "--run-dir", str(out)), lineage_path)
    assert "names no format" in line
