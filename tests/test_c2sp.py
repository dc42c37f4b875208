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

from conftest import REPO, built_once, smalti_cli
from test_ledger import train

GOPATH = "/usr/share/gocode"  # where Debian puts golang.org/x/mod


@pytest.fixture(scope="session")
def go_check(tmp_path_factory) -> Path:
    if shutil.which("go") is None or not Path(GOPATH, "src/golang.org/x/mod/sumdb/note").is_dir():
        pytest.fail("Go and golang.org/x/mod are needed (make go-interop: apt-get install golang-go "
                    "golang-golang-x-mod-dev)")

    def build(folder: Path) -> None:
        env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "", "GOCACHE": str(folder / "cache")}
        built = subprocess.run(["go", "build", "-o", str(folder / "c2sp_check"), str(REPO / "tests/interop/c2sp_check.go")],
                               capture_output=True, text=True, env=env, cwd=folder)
        assert built.returncode == 0, built.stderr

    binary = built_once(tmp_path_factory, "go-c2sp-check", build) / "c2sp_check"
    return binary


def go(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def run(governed, tmp_path_factory) -> Path:
    return train(governed, tmp_path_factory.mktemp("c2sp") / "run", train={"max_duration": "6ba"},
                 checkpoint={"interval": "2ba"}, ledger={"log_name": "example.org/smalti"})


def test_every_tree_head_is_a_checkpoint_that_go_verifies_with_the_printed_verifier_key(run, governed, go_check,
                                                                                         tmp_path):
    from smalti.trust.note import Checkpoint, Verifier, open_note
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
    from smalti.trust.note import NoteError, Verifier, open_note, split_note

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


@pytest.fixture
def put_server(tmp_path):
    """A real HTTP server on loopback that serves a folder and accepts PUT into it; stopped after the test."""
    import sys

    from conftest import free_port, wait_for_port

    folder = tmp_path / "served"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "tests/put_server.py"), str(port), str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, process)
    yield f"http://127.0.0.1:{port}", folder
    process.terminate()
    process.wait(timeout=10)


def synthetic_ledger(run: Path, key, size: int, heads: list[int], origin: str, salt: str = "") -> Path:
    """A ledger of ``size`` entries (real encoder, signed heads at ``heads``) under a given origin: enough
    entries for full tiles at two levels without training 70,000 steps."""
    from smalti.trust import merkle
    from smalti.trust.entry import ZERO_HASH, TreeHead, encode_entry
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    run.mkdir(parents=True)
    store = LedgerStore(ledger_path(run), create=True)
    store.start_log(key.public)
    store.set_meta({"origin": origin})
    frontier, previous, rows = merkle.Frontier(), ZERO_HASH, []
    for index in range(size):
        body = {"kind": "run", "salt": salt} if index == 0 else {"kind": "step", "step": index, "loss": 1.0 / index}
        data = encode_entry(index, previous, body)
        leaf = merkle.leaf_hash(data)
        rows.append((index, index, leaf, data))
        frontier.append(leaf)
        previous = leaf
        if frontier.size in heads:
            store.append(rows, TreeHead.signed(key, origin, frontier.size, frontier.root(), frontier.size == size))
            rows = []
    store.append(rows)
    store.close()
    return run


def test_publish_is_a_tlog_tiles_log_that_go_reads_incrementally_and_never_rewritten(go_check, put_server, tmp_path):
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.governance.ledger.tiles import tile_index, tile_path

    assert [tile_index(n) for n in (0, 67, 1234067)] == ["000", "067", "x001/x234/067"]
    assert tile_path("entries", 5, 17) == "tile/entries/005.p/17" and tile_path(1, 0) == "tile/1/000"
    key, origin = SigningKey.generate(), "example.org/smalti/synthetic"
    full = synthetic_ledger(tmp_path / "full", key, 70_000 // 100, [300, 700], origin)  # 700 entries
    early = tmp_path / "early"
    shutil.copytree(full, early)
    store = LedgerStore(ledger_path(early))
    store.truncate(300)
    store.close()
    base, folder = put_server
    url = f"{base}/logs/run"
    first = smalti_cli("ledger", "publish", str(early), "--to", url)
    assert first.returncode == 0, first.stderr
    verifier = smalti_cli("ledger", "checkpoint", str(full), "--verifier-key").stdout.strip()
    checked = go(go_check, "tiles", url, verifier)
    assert checked.returncode == 0, checked.stderr
    assert "size 300" in checked.stdout and "all 300 entries included" in checked.stdout
    (tmp_path / "old-checkpoint").write_bytes((folder / "logs/run/checkpoint").read_bytes())
    served = folder / "logs/run/tile"
    assert sorted(str(p.relative_to(served)) for p in served.rglob("*") if p.is_file()) == [
        "0/000", "0/001.p/44", "1/000.p/1", "entries/000", "entries/001.p/44"]
    stamps = {p: p.stat().st_mtime_ns for p in served.rglob("*") if p.is_file() and ".p" not in str(p)}

    again = smalti_cli("ledger", "publish", str(full), "--to", url)
    assert again.returncode == 0, again.stderr
    assert "tree size 700 (was 300)" in again.stdout
    checked = go(go_check, "tiles", url, verifier, tmp_path / "old-checkpoint")
    assert checked.returncode == 0, checked.stderr
    assert "all 700 entries included" in checked.stdout and "consistent with size 300" in checked.stdout
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())  # full tiles never written again
    assert (served / "0/002.p/188").is_file() and (served / "1/000.p/2").is_file()

    # Another history under the same log name and key: refused, and the published log is left as it was.
    forked = synthetic_ledger(tmp_path / "forked", key, 800, [800], origin, salt="rewritten")
    before = (folder / "logs/run/checkpoint").read_bytes()
    refused = smalti_cli("ledger", "publish", str(forked), "--to", url)
    assert refused.returncode != 0 and "not a prefix of this ledger" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert (folder / "logs/run/checkpoint").read_bytes() == before
    # A tile tampered with on the server: Go's client refuses the log.
    tampered = bytearray((served / "0/001").read_bytes())
    tampered[5] ^= 1
    (served / "0/001").write_bytes(bytes(tampered))
    assert go(go_check, "tiles", url, verifier).returncode != 0


def test_training_publishes_at_every_checkpoint_and_a_dead_destination_only_warns(governed, go_check, put_server,
                                                                                  tmp_path):
    from conftest import write_recipe
    from test_ledger import ledger_recipe

    base, folder = put_server
    config = ledger_recipe(governed, train={"max_duration": "6ba"}, checkpoint={"interval": "3ba"},
                           ledger={"publish": f"{base}/run"})
    done = smalti_cli("train", str(write_recipe(tmp_path / "r.yaml", config)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    verifier = smalti_cli("ledger", "checkpoint", str(tmp_path / "run"), "--verifier-key").stdout.strip()
    checked = go(go_check, "tiles", f"{base}/run", verifier)
    assert checked.returncode == 0, checked.stderr
    assert (folder / "run/checkpoint").read_text() == smalti_cli("ledger", "checkpoint", str(tmp_path / "run")).stdout

    dead = dict(config, governance={**config["governance"],
                                    "ledger": {**config["governance"]["ledger"], "publish": "http://127.0.0.1:9/x"}})
    done = smalti_cli("train", str(write_recipe(tmp_path / "dead.yaml", dead)), "--run-dir", str(tmp_path / "dead"))
    assert done.returncode == 0, done.stderr
    assert "could not publish the ledger" in done.stderr
    verified = smalti_cli("ledger", "verify", str(tmp_path / "dead"))
    assert verified.returncode == 0, verified.stderr


def test_publish_to_an_s3_compatible_server(s3_server, tmp_path):
    import s3fs

    from smalti.trust.keys import SigningKey

    run = synthetic_ledger(tmp_path / "run", SigningKey.generate(), 260, [260], "example.org/smalti/s3")
    done = smalti_cli("ledger", "publish", str(run), "--to", "s3://corpora/logs/run",
                      "--storage-option", f"client_kwargs.endpoint_url={s3_server}")
    assert done.returncode == 0, done.stderr
    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    assert s3.cat_file("corpora/logs/run/checkpoint").decode() == smalti_cli("ledger", "checkpoint", str(run)).stdout
    assert sorted(p.split("logs/run/")[1] for p in s3.find("corpora/logs/run/tile")) == [
        "tile/0/000", "tile/0/001.p/4", "tile/1/000.p/1", "tile/entries/000", "tile/entries/001.p/4"]
    again = smalti_cli("ledger", "publish", str(run), "--to", "s3://corpora/logs/run",
                       "--storage-option", f"client_kwargs.endpoint_url={s3_server}")
    assert again.returncode == 0 and "0 tiles written" in again.stdout


def test_a_witness_cosigns_only_consistent_checkpoints_and_catches_a_rewritten_history(governed, go_check, tmp_path):
    import base64
    import hashlib
    import struct

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from smalti.trust.keys import SigningKey
    from smalti.trust import merkle
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.governance.ledger.tiles import PublishedLog

    key, origin = SigningKey.generate(), "example.org/smalti/witnessed"
    full = synthetic_ledger(tmp_path / "full", key, 700, [300, 700], origin)
    early = tmp_path / "early"
    shutil.copytree(full, early)
    store = LedgerStore(ledger_path(early))
    store.truncate(300)
    store.close()
    log, state = tmp_path / "log", tmp_path / "witness"
    auditor = governed.key("auditor") if (governed.keys / "auditor.key").exists() else None
    if auditor is None:
        assert smalti_cli("keys", "new", "auditor", "--dir", str(tmp_path / "keys")).returncode == 0
        auditor = tmp_path / "keys" / "auditor.key"
    log_key = smalti_cli("ledger", "checkpoint", str(full), "--verifier-key").stdout.strip()

    def cosign(*extra: str) -> subprocess.CompletedProcess:
        return smalti_cli("witness", "cosign", str(log), "--key", str(auditor), "--state", str(state),
                          "--name", "auditor.example.org/w1", *extra)

    assert smalti_cli("ledger", "publish", str(early), "--to", str(log)).returncode == 0
    refused = cosign()
    assert refused.returncode != 0 and "pass --log-key" in refused.stderr
    first = cosign("--log-key", log_key)
    assert first.returncode == 0 and "first cosignature" in first.stdout, first.stderr
    assert smalti_cli("ledger", "publish", str(full), "--to", str(log)).returncode == 0
    second = cosign()
    assert second.returncode == 0 and "size 700 (consistent with size 300)" in second.stdout, second.stderr

    # The proof the witness checked, read from tiles, is RFC 6962's proof over the leaves themselves.
    leaves = LedgerStore(ledger_path(full)).leaves()
    published = PublishedLog(str(log))
    for first_size in (1, 2, 255, 256, 257, 300, 511, 512, 699):
        assert published.consistency_proof(first_size, 700) == merkle.consistency_proof(first_size, leaves)
    for first_size in (1, 100, 256, 299):
        assert published.consistency_proof(first_size, 300) == merkle.consistency_proof(first_size, leaves[:300])

    # The cosignature, checked by hand against the spec with the cryptography library alone.
    cosigned = (log / "checkpoint").read_text()
    body, signatures = cosigned.rsplit("\n\n", 1)
    line = next(s for s in signatures.splitlines() if s.startswith("\u2014 auditor.example.org/w1 "))
    raw = base64.b64decode(line.split(" ")[2])
    public = SigningKey.load(auditor).public.raw
    assert raw[:4] == hashlib.sha256(b"auditor.example.org/w1\n\x04" + public).digest()[:4] and len(raw) == 76
    (stamp,) = struct.unpack(">Q", raw[4:12])
    Ed25519PublicKey.from_public_bytes(public).verify(raw[12:], f"cosignature/v1\ntime {stamp}\n{body}\n".encode())
    (tmp_path / "cosigned").write_text(cosigned)
    assert go(go_check, "note", log_key, tmp_path / "cosigned").returncode == 0  # Go still opens it: one more line

    auditor_pub = auditor.with_suffix(".pub")
    ok = smalti_cli("ledger", "verify", str(full), "--witness", str(auditor_pub), "--cosigned", str(log))
    assert ok.returncode == 0 and "witness OK: witnessed by auditor.example.org/w1 at size 700" in ok.stdout, ok.stderr
    stranger = smalti_cli("ledger", "verify", str(full), "--witness", str(governed.keys / "trainer.pub"),
                          "--cosigned", str(log))
    assert stranger.returncode == 1 and "no cosignature by witness key" in stranger.stderr

    # The trainer rewrites history under the same name and key and shows the witness the new log: refused, and
    # the witness's state still holds what it saw.
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    forked = synthetic_ledger(tmp_path / "forked", key, 800, [800], origin, salt="rewritten")
    shutil.rmtree(log)
    assert smalti_cli("ledger", "publish", str(forked), "--to", str(log)).returncode == 0
    split = cosign()
    assert split.returncode != 0 and "not consistent with size 700" in split.stderr and "split view" in split.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    diverged = smalti_cli("ledger", "verify", str(forked), "--witness", str(auditor_pub),
                          "--cosigned", str(tmp_path / "cosigned"))
    assert diverged.returncode == 1 and "does not match this ledger" in diverged.stderr
    # Shown an older checkpoint again: a log only grows.
    shutil.rmtree(log)
    assert smalti_cli("ledger", "publish", str(early), "--to", str(log)).returncode == 0
    back = cosign()
    assert back.returncode != 0 and "smaller than size 700" in back.stderr
