"""The ledger's tree heads as C2SP checkpoints in signed notes, checked by the Go project's own transparency-log
code (golang.org/x/mod/sumdb/note and sumdb/tlog, Debian's golang-golang-x-mod-dev), not by ours.

`make test` installs Go and that package with apt-get (the `go-interop` target); without them the tests fail
rather than skip, as the browser test does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, smalti_cli
from test_ledger import train

GOPATH = "/usr/share/gocode"  # where Debian puts golang.org/x/mod


@pytest.fixture(scope="session")
def go_check(tmp_path_factory) -> Path:
    if shutil.which("go") is None or not Path(GOPATH, "src/golang.org/x/mod/sumdb/note").is_dir():
        pytest.fail("Go and golang.org/x/mod are needed (make go-interop: apt-get install golang-go "
                    "golang-golang-x-mod-dev)")
    binary = tmp_path_factory.mktemp("go") / "c2sp_check"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
           "GOCACHE": str(binary.parent / "cache")}
    built = subprocess.run(["go", "build", "-o", str(binary), str(REPO / "tests/interop/c2sp_check.go")],
                           capture_output=True, text=True, env=env, cwd=binary.parent)
    assert built.returncode == 0, built.stderr
    return binary


def go(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(governed, tmp_path_factory) -> Path:
    return train(governed, tmp_path_factory.mktemp("c2sp") / "run", train={"max_duration": "6ba"},
                 checkpoint={"interval": "2ba"}, ledger={"log_name": "example.org/smalti"})


def test_every_tree_head_is_a_checkpoint_that_go_verifies_with_the_printed_verifier_key(run, governed, go_check,
                                                                                         tmp_path):
    from smalti.governance.ledger.note import Checkpoint, Verifier, open_note
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    key = smalti_cli("ledger", "checkpoint", str(run), "--verifier-key")
    assert key.returncode == 0, key.stderr
    verifier = key.stdout.strip()
    store = LedgerStore(ledger_path(run))
    heads, origin = store.heads(), store.origin
    store.close()
    assert origin.startswith("example.org/smalti/") and len(origin.split("/")[-1]) == 16
    assert verifier.startswith(origin + "+")
    named = smalti_cli("keys", "note-key", str(governed.keys / "trainer.pub"), "--name", origin)
    assert named.returncode == 0 and named.stdout.strip() == verifier

    assert len(heads) >= 3
    for head in heads:
        printed = smalti_cli("ledger", "checkpoint", str(run), "--size", str(head.size))
        assert printed.returncode == 0, printed.stderr
        note = tmp_path / f"checkpoint-{head.size}"
        note.write_text(printed.stdout)
        checked = go(go_check, "note", verifier, note)
        assert checked.returncode == 0, checked.stderr
        assert checked.stdout.splitlines()[:2] == [f"origin {origin}", f"size {head.size}"]
        text, signers = open_note(printed.stdout, [Verifier.parse(verifier)])  # our reader agrees
        parsed = Checkpoint.parse(text)
        assert parsed.root == head.root and parsed.extension("final") == ("true" if head.final else "false")
    assert Checkpoint.parse(open_note(printed.stdout, [Verifier.parse(verifier)])[0]).extension("weights")

    # A forged size, another key, or a key of the same bytes under another name: Go refuses each.
    latest = printed.stdout
    forged = tmp_path / "forged"
    forged.write_text(latest.replace(f"\n{heads[-1].size}\n", f"\n{heads[-1].size + 1}\n", 1))
    assert go(go_check, "note", verifier, forged).returncode != 0
    other = smalti_cli("keys", "note-key", str(governed.keys / "model-risk.pub"), "--name", origin).stdout.strip()
    assert go(go_check, "note", other, tmp_path / f"checkpoint-{heads[-1].size}").returncode != 0
    renamed = smalti_cli("keys", "note-key", str(governed.keys / "trainer.pub"), "--name", "example.org/other")
    assert go(go_check, "note", renamed.stdout.strip(), tmp_path / f"checkpoint-{heads[-1].size}").returncode != 0


def test_an_inclusion_proof_checks_against_the_checkpoint_with_go_tlog(run, go_check, tmp_path):
    import base64

    verifier = smalti_cli("ledger", "checkpoint", str(run), "--verifier-key").stdout.strip()
    for step in (1, 4, 6):
        proof = smalti_cli("ledger", "proof", str(run), "--step", str(step))
        assert proof.returncode == 0, proof.stderr
        data = json.loads(proof.stdout)
        checkpoint = smalti_cli("ledger", "checkpoint", str(run), "--size", str(data["tree_size"]))
        (tmp_path / "checkpoint").write_text(checkpoint.stdout)
        (tmp_path / "proof.json").write_text(proof.stdout)
        checked = go(go_check, "inclusion", verifier, tmp_path / "checkpoint", tmp_path / "proof.json")
        assert checked.returncode == 0, checked.stderr
        assert f"entry {data['leaf_index']} included" in checked.stdout
    entry = bytearray(base64.b64decode(data["entry_base64"]))
    entry[-2] ^= 1  # one flipped bit in the entry
    (tmp_path / "proof.json").write_text(json.dumps(dict(data, entry_base64=base64.b64encode(entry).decode())))
    refused = go(go_check, "inclusion", verifier, tmp_path / "checkpoint", tmp_path / "proof.json")
    assert refused.returncode != 0 and "inclusion" in refused.stderr


def test_our_note_reader_opens_notes_go_signed_and_ignores_unknown_keys(go_check, tmp_path):
    from smalti.governance.ledger.note import NoteError, Verifier, open_note, split_note

    skey, vkey = go(go_check, "keygen", "example.org/witness").stdout.split()
    _, stranger = go(go_check, "keygen", "example.org/stranger").stdout.split()
    (tmp_path / "text").write_text("example.org/log\n7\n" + "A" * 43 + "=\n")
    signed = go(go_check, "sign", skey, tmp_path / "text").stdout
    text, signers = open_note(signed, [Verifier.parse(vkey), Verifier.parse(stranger)])
    assert text == (tmp_path / "text").read_text() and [s.name for s in signers] == ["example.org/witness"]
    assert len(split_note(signed)[1]) == 1
    with pytest.raises(NoteError, match="not signed by any known key"):
        open_note(signed, [Verifier.parse(stranger)])
    with pytest.raises(NoteError, match="does not verify"):
        open_note(signed.replace("\n7\n", "\n8\n"), [Verifier.parse(vkey)])
    with pytest.raises(NoteError, match="does not match"):
        name, key_id, key = vkey.split("+", 2)
        Verifier.parse(f"{name}+00000000+{key}")


def test_log_names_with_spaces_or_plus_are_refused_in_one_line(governed, tmp_path):
    from conftest import write_recipe
    from test_ledger import ledger_recipe

    path = write_recipe(tmp_path / "r.yaml", ledger_recipe(governed, ledger={"log_name": "example.org/a+b"}))
    refused = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert refused.returncode != 0 and "governance.ledger.log_name" in refused.stderr
    assert not (tmp_path / "run").exists()
