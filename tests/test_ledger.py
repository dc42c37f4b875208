"""The learning-dynamics ledger: written by the trainer, verified from scratch, exact after kill -9."""

from __future__ import annotations

import hashlib
import html as html_lib
import base64
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
import torch

from smalti.core.algorithm import Algorithm
from smalti.core.event import Event

from conftest import write_policy
from helpers import recipe as make_recipe

HAMLET, TEMPEST, SONNETS = "gutenberg/tragedy/hamlet", "gutenberg/comedy/tempest", "gutenberg/poetry/sonnets"


def ledger_recipe(governed, **sections):
    governance = {"ledger": {"enabled": True, "key": str(governed.key("trainer")), "entropy_every": 4,
                             "flush_every": 3}}
    governance.update(sections.pop("governance", {}))
    if "ledger" in sections:
        governance["ledger"].update(sections.pop("ledger"))
    return governed.recipe(governance=governance, **sections)


def train(governed, run_dir: Path, **sections):
    from smalti.trainer import Trainer

    with Trainer(make_recipe(ledger_recipe(governed, **sections)), run_dir) as trainer:
        trainer.fit()
    return run_dir


def entries(run_dir: Path) -> list[dict]:
    from smalti.trust.entry import decode_entry

    with sqlite3.connect(run_dir / "ledger.sqlite") as db:
        return [decode_entry(row[0]).body for row in db.execute("SELECT data FROM entries ORDER BY idx")]


def test_a_governed_run_writes_one_verifiable_entry_per_step(governed, tmp_path):
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.verify import verify_ledger

    run = train(governed, tmp_path / "run", train={"max_duration": "10ba"})
    report = verify_ledger(run, PublicKey.load(governed.keys / "trainer.pub"), deep=True)
    assert report.ok, report.problem
    body = entries(run)
    assert body[0]["kind"] == "run" and [e["step"] for e in body[1:]] == list(range(1, 11))
    assert report.entries == 11 and report.last_head["final"]
    assert all(sum(len(ids) for ids in e["examples"].values()) == 8 for e in body[1:])
    assert sum(body[1]["counts"].values()) == 8
    assert [("entropy" in e) for e in body[1:]] == [s % 4 == 0 for s in range(1, 11)]


# ------------------------------------------------------------------ shared runs

def train_policy_run(governed, root: Path, device: str = "cpu") -> Path:
    """A run under a known policy: histories/poetry never reach the embedding; Hamlet is confined to its adapter.

    Checkpoints every step, so tests can replay any step from the weights before it.
    """
    policy = write_policy(governed, root / "policy.yaml",
                          [{"classes": ["gutenberg/poetry"], "params": ["tok_emb.*"], "action": "deny"}],
                          [{"classes": [HAMLET], "params": ["@adapter"]}])
    return train(governed, root / "run", governance={"policy": str(policy)},
                 model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                 train={"max_duration": "8ba", "microbatch_size": 2, "device": device},
                 data={"batching": "per_class"}, checkpoint={"interval": "1ba", "keep": 100})


@pytest.fixture(scope="module")
def policy_run(governed, tmp_path_factory):
    return train_policy_run(governed, tmp_path_factory.mktemp("policy_run"))


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


def _verify(run: Path, deep: bool = False, key: Path | None = None, workers: int | None = None):
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.verify import verify_ledger

    return verify_ledger(run, PublicKey.load(key) if key else None, deep=deep, workers=workers)


# ------------------------------------------------------------------ G3: tamper evidence

def _rewrite(run: Path, index: int, data: bytes, *, rehash: bool) -> None:
    """Store new bytes for an entry; with ``rehash`` also its leaf and every later entry's chain link."""
    from smalti.trust.entry import HEADER_SIZE, HEADER, MAGIC

    with sqlite3.connect(run / "ledger.sqlite") as db:
        rows = db.execute("SELECT idx, data FROM entries WHERE idx >= ? ORDER BY idx", (index,)).fetchall()
        previous = None
        for idx, old in rows:
            new = data if idx == index else old
            if previous is not None:
                new = HEADER.pack(MAGIC, idx, previous) + new[HEADER_SIZE:]
            leaf = hashlib.sha256(b"\x00" + new).digest()
            if idx == index or rehash:
                db.execute("UPDATE entries SET data = ?, leaf = ? WHERE idx = ?",
                           (new, leaf if rehash else db.execute("SELECT leaf FROM entries WHERE idx = ?",
                                                                (idx,)).fetchone()[0], idx))
            if not rehash:
                break
            previous = leaf


def _mutate_field(data: bytes, key: str) -> bytes:
    from smalti.trust.entry import HEADER_SIZE, canonical_json

    body = json.loads(data[HEADER_SIZE:])
    value = body[key]
    if isinstance(value, bool):
        body[key] = not value
    elif isinstance(value, (int, float)):
        body[key] = value + 1
    elif isinstance(value, str):
        body[key] = value + "x"
    elif isinstance(value, list):
        body[key] = value[1:] if value else [0]
    elif isinstance(value, dict):
        body[key] = {**value, "tampered": 1}
    else:
        body[key] = 1
    return data[:HEADER_SIZE] + canonical_json(body)


def test_changing_any_field_of_any_entry_is_detected_and_located(policy_run, tmp_path):
    with sqlite3.connect(policy_run / "ledger.sqlite") as db:
        originals = db.execute("SELECT idx, data FROM entries ORDER BY idx").fetchall()
    checked = 0
    for index, data in originals:
        from smalti.trust.entry import HEADER_SIZE

        for key in json.loads(data[HEADER_SIZE:]):
            run = _copy_run(policy_run, tmp_path / f"{index}-{key}")
            _rewrite(run, index, _mutate_field(data, key), rehash=False)
            report = _verify(run)
            assert not report.ok and report.problem.startswith(f"entry {index} "), (index, key, report.problem)
            assert "does not match its leaf hash" in report.problem
            checked += 1
    assert checked > 100


def test_an_edit_with_recomputed_hashes_is_caught_by_the_signed_root(policy_run, tmp_path):
    run = _copy_run(policy_run, tmp_path)
    with sqlite3.connect(run / "ledger.sqlite") as db:
        data = db.execute("SELECT data FROM entries WHERE idx = 5").fetchone()[0]
    _rewrite(run, 5, _mutate_field(data, "loss"), rehash=True)
    report = _verify(run)
    assert not report.ok and report.problem.startswith("tree head at size 6:")
    assert "entries 5..5" in report.problem


@pytest.mark.parametrize("attack, expected", [
    ("delete", "entry 3: missing"),
    ("insert", "entry 4 (step 3): its header says index 3"),
    ("reorder", "entry 3 (step 4): its header says index 4"),
    ("truncate", "tree head at size 8: the ledger has only 7 entries"),
    ("truncate_with_heads", "is not the final one"),
    ("append", "not covered by a signed tree head"),
    ("head_root", "tree head at size 4: its signed root does not match"),
    ("head_forged", "tree head at size 4: signature is not valid"),
    ("head_final_flag", "tree head at size 8: signature is not valid"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_deleting_inserting_reordering_truncating_and_forging_are_detected(policy_run, tmp_path, monkeypatch,
                                                                          attack, expected, workers):
    from smalti.governance.ledger import verify

    monkeypatch.setattr(verify, "SPAN", 2)  # with workers: spans of two entries, so every attack lands in one
    run = _copy_run(policy_run, tmp_path)
    with sqlite3.connect(run / "ledger.sqlite") as db:
        rows = db.execute("SELECT idx, step, leaf, data FROM entries ORDER BY idx").fetchall()
        if attack == "delete":
            db.execute("DELETE FROM entries WHERE idx = 3")
        elif attack == "insert":  # a copy of entry 3 slotted in after it; everything after moves up
            db.execute("DELETE FROM entries WHERE idx >= 4")
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)",
                           [(i + 1, s, leaf, data) for i, s, leaf, data in rows[3:]])
        elif attack == "reorder":
            a, b = rows[3], rows[4]
            db.execute("UPDATE entries SET step = ?, leaf = ?, data = ? WHERE idx = 3", b[1:])
            db.execute("UPDATE entries SET step = ?, leaf = ?, data = ? WHERE idx = 4", a[1:])
        elif attack == "truncate":
            db.execute("DELETE FROM entries WHERE idx >= 7")
        elif attack == "truncate_with_heads":
            db.execute("DELETE FROM entries WHERE idx >= 7")
            db.execute("DELETE FROM heads WHERE size > 7")
        elif attack == "append":  # a well-formed, correctly chained entry that no head signed
            from smalti.trust.entry import encode_entry

            last = rows[-1]
            data = encode_entry(last[0] + 1, last[2], {"kind": "step", "step": last[1] + 1})
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)",
                       (last[0] + 1, last[1] + 1, hashlib.sha256(b"\x00" + data).digest(), data))
        elif attack == "head_root":
            db.execute("UPDATE heads SET root = ? WHERE size = 4", (bytes(32),))
        elif attack == "head_forged":
            db.execute("UPDATE heads SET signature = ? WHERE size = 4", (bytes(64),))
        elif attack == "head_final_flag":  # pretend training finished at step 7
            db.execute("UPDATE heads SET final = 1 WHERE size = 8")
            db.execute("DELETE FROM heads WHERE size > 8")
            db.execute("DELETE FROM entries WHERE idx >= 8")
    report = _verify(run, workers=workers)
    assert not report.ok and expected in report.problem, report.problem


def test_resigning_with_another_key_fails_against_the_trainer_key(policy_run, governed, tmp_path):
    from smalti.trust.keys import PublicKey, SigningKey
    from smalti.trust.entry import TreeHead

    run = _copy_run(policy_run, tmp_path)
    impostor = SigningKey.load(governed.key("model-risk"))
    with sqlite3.connect(run / "ledger.sqlite") as db:
        origin = db.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()[0]
        rows = db.execute("SELECT size, root, timestamp, final, weights FROM heads").fetchall()
        for size, root, timestamp, final, weights in rows:
            head = TreeHead(size=size, root=root, timestamp=timestamp, final=bool(final), weights=weights,
                            origin=origin)
            db.execute("UPDATE heads SET key_id = ?, signature = ? WHERE size = ?",
                       (impostor.public.key_id, impostor.sign(head.message()), size))
        db.execute("UPDATE meta SET value = ? WHERE key = 'trainer_public_key'", (impostor.public.text,))
    report = _verify(run, key=governed.keys / "trainer.pub")
    trainer_id = PublicKey.load(governed.keys / "trainer.pub").key_id
    assert not report.ok and f"signed by key {impostor.public.key_id}, not by trainer key {trainer_id}" in report.problem
    assert _verify(run).ok  # integrity alone holds: which is why the auditor passes --pubkey
    with sqlite3.connect(run / "ledger.sqlite") as db:  # the trainer's key id, the impostor's signature
        db.execute("UPDATE heads SET key_id = ?", (trainer_id,))
    report = _verify(run, key=governed.keys / "trainer.pub")
    assert not report.ok and "signature is not valid for trainer key" in report.problem  # integrity alone holds: which is why the auditor passes --pubkey
    assert _verify(policy_run, deep=True, key=governed.keys / "trainer.pub").ok


def _synthetic_ledger(run: Path, key, size: int, head_sizes: list[int], magic: bytes | None = None) -> None:
    """A ledger written entry by entry with the real encoder (or, with ``magic``, an older format's header)."""
    from smalti.trust import merkle
    from smalti.trust.entry import HEADER, ZERO_HASH, TreeHead, canonical_json, encode_entry
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    run.mkdir(parents=True, exist_ok=True)
    store = LedgerStore(ledger_path(run), create=True)
    origin = store.start_log(key.public)
    frontier, previous, rows = merkle.Frontier(), ZERO_HASH, []
    for index in range(size):
        body = {"kind": "run"} if index == 0 else {
            "kind": "step", "step": index, "loss": 1.0 / index, "layers": [[1, 0.5, None, 0.25, 2.0, 0.125]] * 3,
            "contributions": {HAMLET: [[0, 0.5, 0.75], [2, 0.25, 1.0]], TEMPEST: [[0, 0.125, 0.25]]}}
        data = (HEADER.pack(magic, index, previous) + canonical_json(body) if magic
                else encode_entry(index, previous, body))
        leaf = merkle.leaf_hash(data)
        rows.append((index, index, leaf, data))
        frontier.append(leaf)
        previous = leaf
        if frontier.size in head_sizes:
            store.append(rows, TreeHead.signed(key, origin, frontier.size, frontier.root(), frontier.size == size,
                                               timestamp="2026-01-01T00:00:00+00:00"))
            rows = []
    store.append(rows)
    store.close()


@pytest.mark.parametrize("chunk, span, workers", [(1, 8192, 1), (4, 8192, 1), (16, 8192, 1), (4096, 8192, 1),
                                                   (4, 8, 2), (16, 4, 3), (4096, 16, 2), (1, 1, 2)])
def test_verification_read_in_chunks_names_the_same_problems(tmp_path, monkeypatch, chunk, span, workers):
    """verify checks whole chunks (in worker processes: whole spans) at once and walks entry by entry only where
    one fails: wherever the chunk and span edges and the signed heads fall, it accepts the intact ledger and names
    the same first problem."""
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger import verify

    monkeypatch.setattr(verify, "CHUNK", chunk)
    monkeypatch.setattr(verify, "SPAN", span)
    grafted = []  # spans the workers checked, joined by the parent
    monkeypatch.setattr(verify._Walk, "graft", lambda walk, span, graft=verify._Walk.graft: grafted.append(span)
                        or graft(walk, span))
    key = SigningKey.generate()
    run = tmp_path / "run"
    _synthetic_ledger(run, key, 50, [7, 20, 33, 50])
    report = verify.verify_ledger(run, key.public, workers=workers)
    assert report.ok and report.entries == 50 and report.heads == 4, report.problem
    assert len(grafted) == (-(-50 // span) if workers > 1 else 0)  # the workers did hash the whole ledger
    assert verify.verify_ledger(run, key.public, deep=True, workers=workers).ok
    with sqlite3.connect(run / "ledger.sqlite") as db:
        data = db.execute("SELECT data FROM entries WHERE idx = 25").fetchone()[0]
    edited = _copy_run(run, tmp_path / "edited")
    _rewrite(edited, 25, _mutate_field(data, "loss"), rehash=False)
    assert verify.verify_ledger(edited, key.public, workers=workers).problem == (
        "entry 25 (step 25): content does not match its leaf hash (edited after it was written)")
    rehashed = _copy_run(run, tmp_path / "rehashed")
    _rewrite(rehashed, 25, _mutate_field(data, "loss"), rehash=True)
    assert verify.verify_ledger(rehashed, key.public, workers=workers).problem.startswith(
        "tree head at size 33: its signed root does not match entries 20..32")
    deleted = _copy_run(run, tmp_path / "deleted")
    with sqlite3.connect(deleted / "ledger.sqlite") as db:
        db.execute("DELETE FROM entries WHERE idx = 40")
    assert verify.verify_ledger(deleted, key.public, workers=workers).problem.startswith("entry 40: missing")
    from smalti.trust.entry import HEADER, HEADER_SIZE, MAGIC

    relinked = _copy_run(run, tmp_path / "relinked")  # entry 32 (a span's first) chained to nothing, then rehashed
    with sqlite3.connect(run / "ledger.sqlite") as db:
        data = db.execute("SELECT data FROM entries WHERE idx = 32").fetchone()[0]
    _rewrite(relinked, 32, HEADER.pack(MAGIC, 32, bytes(32)) + data[HEADER_SIZE:], rehash=True)
    assert verify.verify_ledger(relinked, key.public, workers=workers).problem == (
        "entry 32 (step 32): hash chain broken (the entry before it was changed, removed or reordered)")


def test_a_damaged_store_is_a_one_line_failure_saying_from_where(tmp_path, monkeypatch):
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger import verify

    monkeypatch.setattr(verify, "SPAN", 256)
    monkeypatch.setattr(verify, "CHUNK", 64)  # read in this process 64 entries at a time
    key, run = SigningKey.generate(), tmp_path / "run"
    _synthetic_ledger(run, key, 2000, list(range(100, 2001, 100)))
    path = run / "ledger.sqlite"
    pages = path.stat().st_size // 16384
    with open(path, "r+b") as file:  # one page in the middle of the entries overwritten
        file.seek(pages // 2 * 16384)
        file.write(b"\xff" * 16384)
    alone, with_workers = (verify.verify_ledger(run, key.public, workers=workers) for workers in (1, 2))
    assert not alone.ok and re.fullmatch(
        r"entries from (\d+) on cannot be read: the SQLite file is damaged \(database disk image is malformed\); "
        r"the entries before them check out", alone.problem), alone.problem
    assert 0 < int(re.match(r"entries from (\d+)", alone.problem)[1]) < 2000
    assert with_workers.problem == alone.problem


def test_format_1_ledgers_still_verify_and_read(tmp_path):
    """Entries written before the numeric tables were packed (b"TSL1", every number in decimal)."""
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.audit import Ledger
    from smalti.governance.ledger.verify import verify_ledger

    key = SigningKey.generate()
    _synthetic_ledger(tmp_path / "old", key, 12, [5, 12], magic=b"TSL1")
    report = verify_ledger(tmp_path / "old", key.public, deep=True)
    assert report.ok, report.problem
    steps = Ledger.load(tmp_path / "old").steps
    assert steps[0]["layers"][0] == [1, 0.5, None, 0.25, 2.0, 0.125]
    assert steps[0]["contributions"][HAMLET] == [[0, 0.5, 0.75], [2, 0.25, 1.0]]


def test_ledger_verify_command_exit_codes_and_messages(policy_run, governed, tmp_path):
    from conftest import smalti_cli

    good = smalti_cli("ledger", "verify", str(policy_run), "--pubkey", str(governed.keys / "trainer.pub"))
    assert good.returncode == 0 and "ledger OK: 9 entries" in good.stdout
    run = _copy_run(policy_run, tmp_path)
    with sqlite3.connect(run / "ledger.sqlite") as db:
        db.execute("DELETE FROM entries WHERE idx = 2")
    bad = smalti_cli("ledger", "verify", str(run), "--workers", "1")
    assert bad.returncode == 1 and "entry 2: missing" in bad.stderr
    no_workers = smalti_cli("ledger", "verify", str(policy_run), "--workers", "0")
    assert no_workers.returncode == 2 and "--workers: expected a whole number of at least 1, got '0'" in (
        no_workers.stderr)
    missing = smalti_cli("ledger", "verify", str(tmp_path / "nowhere"))
    assert missing.returncode != 0 and "no ledger here" in missing.stderr


def _fold(index: int, size: int, leaf: bytes, path: list[bytes]) -> bytes:
    """RFC 9162 2.1.3.2, written out independently of smalti's merkle module."""
    fn, sn, r = index, size - 1, leaf
    for p in path:
        if fn & 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn, sn = fn >> 1, sn >> 1
    return r


def test_inclusion_proof_checks_without_smalti(policy_run, governed):

    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from conftest import smalti_cli

    result = smalti_cli("ledger", "proof", str(policy_run), "--step", "5")
    assert result.returncode == 0, result.stderr
    proof = json.loads(result.stdout)
    entry = base64.b64decode(proof["entry_base64"])
    leaf = hashlib.sha256(b"\x00" + entry).digest()
    head = proof["tree_head"]
    path = [bytes.fromhex(p) for p in proof["audit_path"]]
    assert _fold(proof["leaf_index"], head["size"], leaf, path).hex() == head["root"]
    assert _fold(proof["leaf_index"], head["size"], hashlib.sha256(b"\x00" + entry + b" ").digest(),
                 path).hex() != head["root"]
    public = load_pem_private_key(governed.key("trainer").read_bytes(), None).public_key()
    public.verify(bytes.fromhex(head["signature"]), head["message"].encode())  # raises if forged
    lines = head["message"].splitlines()  # a C2SP checkpoint: origin, size, base64 root, extensions
    assert lines[0] == head["origin"] and int(lines[1]) == head["size"]
    assert base64.b64decode(lines[2]).hex() == head["root"]


def test_show_and_export(policy_run, tmp_path):
    import pyarrow.parquet as pq

    from conftest import smalti_cli

    listing = smalti_cli("ledger", "show", str(policy_run))
    assert listing.returncode == 0 and len(listing.stdout.strip().splitlines()) == 8
    one = smalti_cli("ledger", "show", str(policy_run), "--step", "3", "--json")
    assert json.loads(one.stdout)["entry"]["step"] == 3
    assert smalti_cli("ledger", "show", str(policy_run), "--step", "99").returncode != 0
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / f"ledger.{fmt}"
        assert smalti_cli("ledger", "export", str(policy_run), "--format", fmt, "--out", str(out)).returncode == 0
        rows = ([json.loads(line) for line in out.read_text().splitlines()] if fmt == "jsonl"
                else pq.read_table(out).to_pylist())
        assert [r["index"] for r in rows] == list(range(9))
        assert [r["step"] for r in rows][1:] == list(range(1, 9))


# ------------------------------------------------------------------ G4: accuracy against a replay

@pytest.fixture(scope="module")
def mixed_run(governed, tmp_path_factory):
    """No policy, random batches: several classes per microbatch, which the ledger splits by signature."""
    root = tmp_path_factory.mktemp("mixed_run")
    return train(governed, root / "run", train={"max_duration": "6ba"}, checkpoint={"interval": "1ba", "keep": 100})


def _allowed(run_name: str, class_name: str, parameter: str) -> bool:
    """The policy_run's policy, written out by hand (independent of the router)."""
    if run_name == "mixed":
        return True
    if run_name == "hf":  # tests/test_hf_models.py: Hamlet in its LoRA adapter, poetry off the embedding
        hamlet_adapter = ".gutenberg_tragedy_hamlet." in parameter
        if class_name == HAMLET or hamlet_adapter:
            return class_name == HAMLET and hamlet_adapter
        return not (class_name.startswith("gutenberg/poetry") and parameter.startswith("model.embed_tokens."))
    hamlet_adapter = ".adapters.gutenberg_tragedy_hamlet." in parameter
    if class_name == HAMLET:
        return hamlet_adapter
    if hamlet_adapter:
        return False
    return not (class_name.startswith("gutenberg/poetry") and parameter.startswith("tok_emb."))


@pytest.mark.parametrize("which", ["policy", "mixed"])
def test_recorded_contributions_equal_an_independent_replay(which, policy_run, mixed_run, governed):
    assert _replayed_cells(policy_run if which == "policy" else mixed_run, which) > 50


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_run_records_what_a_cpu_replay_computes(governed, tmp_path):
    """Statistics kept on the GPU and flushed in batches: the ledger verifies, and its numbers match a
    float64 replay on the CPU (float32 on a different device: looser tolerance than on the CPU)."""
    run = train_policy_run(governed, tmp_path, device="cuda")
    report = _verify(run, deep=True, key=governed.keys / "trainer.pub")
    assert report.ok, report.problem
    assert _replayed_cells(run, "policy", rel=1e-4, abs=1e-5) > 50


def _replayed_cells(run: Path, which: str, rel: float = 1e-5, abs: float = 1e-6) -> int:
    """Recompute every step's per-class gradients from the checkpoint before it and compare with the ledger;
    returns how many (step, layer, class) cells were checked."""
    from smalti.build import build_data, build_model
    from smalti.checkpoint import load_checkpoint
    from smalti.config import load_recipe
    from smalti.distributed import DistInfo
    from smalti.models.rows import set_rows

    recipe = load_recipe(run / "recipe.yaml")
    data = build_data(recipe, DistInfo())
    body = entries(run)
    layers = body[0]["layers"]
    checked = 0
    for entry in body[2:]:
        step = entry["step"]
        before = load_checkpoint(run / "checkpoints" / f"ep0-ba{step - 1}.pt")["model"]
        after = load_checkpoint(run / "checkpoints" / f"ep0-ba{step}.pt")["model"]
        model = build_model(recipe, data.tokenizer.vocab_size if data.tokenizer else 0, data.class_names)
        model.load_state_dict(before)
        params = dict(model.named_parameters())
        all_ids = [i for ids in entry["examples"].values() for i in ids]
        units = float(model.loss_units(data.train.gather(torch.tensor(all_ids)).targets))
        grads = {}
        for class_name, ids in entry["examples"].items():
            batch = data.train.gather(torch.tensor(ids))
            set_rows(model, batch, step - 1)  # the step's draw (a diffusion model's noise: smalti.models.diffusion)
            loss = model.loss(model(batch.inputs), batch.targets) / units
            names = [n for n in params if _allowed(which, class_name, n)]
            found = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            # a parameter the class's rows never reached (an expert no token of it was routed to) learned nothing
            grads[class_name] = {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, found)}
        for j, layer in enumerate(layers):
            total = {n: sum(g[n] for g in grads.values() if n in g) for n in layer["parameters"]}
            total = {n: t for n, t in total.items() if isinstance(t, torch.Tensor)}
            total_sq = sum(float((t.double() ** 2).sum()) for t in total.values())
            recorded = {sig: (norm, share) for sig, cells in entry["contributions"].items()
                        for layer_index, norm, share in cells if layer_index == j}
            for class_name, g in grads.items():
                mine = [g[n] for n in layer["parameters"] if n in g]
                norm = sum(float((t.double() ** 2).sum()) for t in mine) ** 0.5
                if not mine or norm == 0:
                    assert class_name not in recorded, (step, layer["name"], class_name)
                    continue
                share = sum(float((g[n].double() * total[n].double()).sum()) for n in layer["parameters"]
                            if n in g) / total_sq
                got_norm, got_share = recorded[class_name]
                assert got_norm == pytest.approx(norm, rel=rel, abs=1e-9), (step, layer["name"], class_name)
                assert got_share == pytest.approx(share, abs=abs), (step, layer["name"], class_name)
                checked += 1
            moved = any(not torch.equal(before[n], after[n]) for n in layer["parameters"])
            assert bool(entry["layers"][j][0]) == moved, (step, layer["name"])
            update = sum(float(((after[n].double() - before[n].double()) ** 2).sum()) for n in layer["parameters"])
            assert entry["layers"][j][1] == pytest.approx(update ** 0.5, rel=1e-4, abs=1e-9)
    return checked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_the_ledger_never_waits_for_the_gpu_between_flushes(governed, tmp_path, monkeypatch):
    """The ledger's per-step code runs under CUDA's sync debug mode "error": a device-to-host copy, a
    synchronising host-to-device copy or a stream synchronisation inside it raises. Only the flush
    (here: at the end) and the entropy probe (off here) may wait for the device. (The backward pass
    itself is training's, not the ledger's, and is left out.)"""
    from smalti.governance.ledger.recorder import ContributionRecorder
    from smalti.governance.ledger.writer import Ledger

    checked = []

    def strict(owner, name):
        method = getattr(owner, name)

        def wrapped(self, *args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return method(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                checked.append(name)
        return wrapped

    for owner, names in ((Ledger, ("start_step", "gradient_statistics", "after_optimizer_step")),
                         (ContributionRecorder, ("_row_for", "_accumulate", "_add_to_grad"))):
        for name in names:
            monkeypatch.setattr(owner, name, strict(owner, name))
    run = train(governed, tmp_path / "run", train={"max_duration": "6ba", "microbatch_size": 2, "device": "cuda"},
                data={"batching": "per_class"}, ledger={"flush_every": 1000, "entropy_every": 0})
    assert checked.count("after_optimizer_step") == 6 and checked.count("_accumulate") >= 12
    assert _verify(run, key=governed.keys / "trainer.pub").ok


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_recording_does_not_change_training(governed, tmp_path, device):
    """Per-class batches: the weights after training are bitwise those of the same run without a ledger."""
    from helpers import assert_tree_equal, latest_payload

    from smalti.trainer import Trainer

    sections = dict(train={"max_duration": "6ba", "microbatch_size": 2, "device": device},
                    data={"batching": "per_class"})
    with_ledger = train(governed, tmp_path / "on", **sections)
    with Trainer(make_recipe(governed.recipe(**sections)), tmp_path / "off") as plain:
        plain.fit()
    assert_tree_equal(latest_payload(with_ledger)["model"], latest_payload(tmp_path / "off")["model"])
    assert_tree_equal(latest_payload(with_ledger)["optimizer"], latest_payload(tmp_path / "off")["optimizer"])


class DropFirstTwo(Algorithm):
    """A stand-in for selective backprop: drops two examples of every batch after loading."""

    def match(self, event, state):
        return event == Event.AFTER_DATALOADER

    def apply(self, event, state, logger):
        state.batch = state.batch.select(slice(2, None))


class OutsideGradient(Algorithm):
    """Puts a large gradient of its own into the token embedding's ``.grad`` before each step's backward."""

    def match(self, event, state):
        return event == Event.AFTER_DATALOADER

    def apply(self, event, state, logger):
        weight = dict(state.model.named_parameters())["tok_emb.weight"]
        weight.grad = torch.full_like(weight, 100.0)


def test_a_gradient_from_outside_the_recorder_counts_in_the_step_but_for_no_class(governed, tmp_path):
    """The outside gradient joins .grad exactly as autograd's accumulation would (training bitwise that of the
    run without a ledger) and the step gradient G, but no signature: in that layer |G| is its size and the
    classes' shares sum far below 1; everywhere else they sum to 1."""
    from helpers import assert_tree_equal, latest_payload

    from smalti.trainer import Trainer

    sections = dict(train={"max_duration": "3ba", "microbatch_size": 2}, data={"batching": "per_class"})
    for name, recipe in (("on", ledger_recipe(governed, **sections)), ("off", governed.recipe(**sections))):
        with Trainer(make_recipe(recipe), tmp_path / name, algorithms=[OutsideGradient()]) as trainer:
            trainer.fit()
    assert_tree_equal(latest_payload(tmp_path / "on")["model"], latest_payload(tmp_path / "off")["model"])
    body = entries(tmp_path / "on")
    layers = [layer["name"] for layer in body[0]["layers"]]
    embedding = layers.index("tok_emb")
    numel = latest_payload(tmp_path / "on")["model"]["tok_emb.weight"].numel()
    for entry in body[1:]:
        shares = [0.0] * len(layers)
        for cells in entry["contributions"].values():
            for j, _, share in cells:
                shares[j] += share
        assert entry["layers"][embedding][5] == pytest.approx(100.0 * numel**0.5, rel=1e-2)
        assert shares[embedding] < 0.1
        assert all(s == pytest.approx(1.0, abs=1e-6) for j, s in enumerate(shares) if j != embedding and s)


@pytest.mark.parametrize("every_trainable", [False, True], ids=["inputs", "plain"])
def test_gradients_autograd_returns_for_several_parameters_are_copied_not_shared(every_trainable):
    """``a + b`` gives a and b one and the same gradient tensor (a view, for a sum); taking it as both
    ``.grad``s would add every later microbatch twice. The recorder's rows and ``.grad`` match autograd,
    whether its backward pass runs with ``inputs=`` (a plan that denies some parameter) or without (a plan
    that denies none)."""
    from types import SimpleNamespace

    from smalti.governance.ledger.recorder import ContributionRecorder
    from smalti.governance.routing import MicrobatchPlan

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(3))
            self.b = torch.nn.Parameter(torch.ones(3))

    model = Pair()
    params = [model.a, model.b]
    recorder = ContributionRecorder(SimpleNamespace(model=model, params=params, names=["a", "b"], sharded=False,
                                                    autograd_params=lambda: params))
    inputs = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -1.0, 4.0]), torch.tensor([2.0, 0.0, 1.0])]
    losses = [lambda x: ((model.a + model.b) * x).sum(), lambda x: (model.a + model.b).sum() * x.sum()]
    for loss in losses:
        recorder.start_step()
        for k, x in enumerate(inputs):
            plan = MicrobatchPlan(rows=1, input_indices=[0, 1], holders=params, every_trainable=every_trainable)
            recorder.backward(loss(x), plan, "first" if k != 1 else "second")
        expected = [torch.autograd.grad(loss(x), params) for x in inputs]
        for i, p in enumerate(params):
            assert torch.equal(p.grad, expected[0][i] + expected[1][i] + expected[2][i])
        assert model.a.grad.data_ptr() != model.b.grad.data_ptr()
        rows = recorder._row_views
        assert torch.equal(rows[1][0], expected[0][0] + expected[2][0])  # "first": microbatches 1 and 3
        assert torch.equal(rows[2][1], expected[1][1])
        model.a.grad = model.b.grad = None


def test_contribution_and_update_numbers_against_a_direct_float64_computation():
    """Gram matrices of random rows (an outside row first) against norms and dot products taken directly."""
    import numpy as np

    from smalti.governance.ledger.layout import FlatLayout
    from smalti.governance.ledger.recorder import contribution_numbers, update_numbers

    generator = np.random.default_rng(0)
    numels = [6, 10, 6, 70000]
    layout = FlatLayout(numels, np.array([0, 1, 2, 1]), 3)
    rows = torch.from_numpy(generator.normal(size=(4, layout.size)).astype(np.float32))
    parts = lambda row, layer: np.concatenate(  # noqa: E731
        [row[o:o + n] for i, (o, n) in enumerate(zip(layout.offsets, numels)) if [0, 1, 2, 1][i] == layer])
    for outside in (True, False):
        used = rows if outside else rows[1:]
        norms, dots, gradient_sq = contribution_numbers(layout.gram(used).numpy(), outside, 0.5)
        data = used.double().numpy()
        for layer in range(3):
            total = sum(parts(r, layer) for r in data)
            assert gradient_sq[layer] == pytest.approx(0.25 * total @ total, rel=1e-5)
            for s, r in enumerate(data[1:] if outside else data):
                assert norms[s, layer] == pytest.approx(0.5 * np.linalg.norm(parts(r, layer)), rel=1e-5)
                assert dots[s, layer] == pytest.approx(0.25 * parts(r, layer) @ total, rel=1e-4, abs=1e-3)
    roles = (2, 0, 3, 1)  # after, before, this update, the previous one
    update, before, after, dot_previous, previous = update_numbers(layout.gram(rows).numpy(), roles)
    data = rows.double().numpy()
    for layer in range(3):
        row = lambda r: parts(data[r], layer)  # noqa: E731
        assert update[layer] == pytest.approx(np.linalg.norm(row(3)), rel=1e-5)
        assert before[layer] == pytest.approx(np.linalg.norm(row(0)), rel=1e-5)
        assert after[layer] == pytest.approx(np.linalg.norm(row(2)), rel=1e-5)
        assert previous[layer] == pytest.approx(np.linalg.norm(row(1)), rel=1e-5)
        assert dot_previous[layer] == pytest.approx(row(3) @ row(1), rel=1e-4, abs=1e-3)


def test_dropped_examples_are_recorded_as_not_contributing(governed, tmp_path):
    from smalti.governance.ledger.audit import Ledger
    from smalti.trainer import Trainer

    trainer = Trainer(make_recipe(ledger_recipe(governed, train={"max_duration": "3ba"})), tmp_path / "run",
                      algorithms=[DropFirstTwo()])
    trainer.fit()
    trainer.close()
    body = entries(tmp_path / "run")[1:]
    for entry in body:
        kept = {i for ids in entry["examples"].values() for i in ids}
        assert len(entry["dropped"]) == 2 and len(kept) == 6 and not kept & set(entry["dropped"])
    victim = body[0]["dropped"][0]
    answer = Ledger.load(tmp_path / "run").example(victim)
    assert answer["dropped_in_steps"] == "1" and answer["appearances"] == []


def test_a_ledger_key_that_is_not_the_taxonomys_trainer_key_refuses_to_train(governed, tmp_path):
    from smalti.errors import SmaltiError
    from smalti.trainer import Trainer

    recipe = make_recipe(ledger_recipe(governed, ledger={"key": str(governed.key("model-risk"))}))
    with pytest.raises(SmaltiError, match="is not the trainer key"):
        Trainer(recipe, tmp_path / "run")


def test_a_ledger_edited_behind_a_checkpoint_refuses_to_resume(governed, tmp_path):
    from smalti.errors import SmaltiError
    from smalti.trainer import Trainer

    run = train(governed, tmp_path / "run", train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"})
    with sqlite3.connect(run / "ledger.sqlite") as db:
        db.execute("UPDATE entries SET leaf = ? WHERE idx = 1", (bytes(32),))
    longer = make_recipe(ledger_recipe(governed, train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"}))
    with pytest.raises(SmaltiError, match="do not match the checkpoint's signed tree head"):
        Trainer(longer, run)


# ------------------------------------------------------------------ audit answers

def test_audit_answers_follow_the_known_policy(policy_run):
    from smalti.governance.ledger.audit import AuditError, Ledger

    ledger = Ledger.load(policy_run)
    embedding = ledger.layer("tok_emb")
    assert SONNETS not in embedding["classes"] and {HAMLET} & set(embedding["classes"]) == set()
    assert embedding["classes"] and sum(r["share_of_total"] for r in embedding["classes"].values()) == \
        pytest.approx(1.0)
    poetry = ledger.for_class("gutenberg/poetry")
    assert "tok_emb" in poetry["layers_never_touched"] and poetry["layers_touched"]
    hamlet = ledger.for_class(HAMLET)
    assert hamlet["layers_touched"] and all(".adapters.gutenberg_tragedy_hamlet." in name
                                            for name in hamlet["layers_touched"])
    adapter = ledger.layer("blocks.0.mlp.adapters.gutenberg_tragedy_hamlet.fc")
    assert set(adapter["classes"]) == {HAMLET}
    assert ledger.parameter("head.weight" if False else "tok_emb.weight")["layer"] == "tok_emb"
    # Keys are new each session, so the dataset fingerprint (and the sample order) is too: find Hamlet.
    first = next(e for e in ledger.steps if HAMLET in e["examples"])
    example = ledger.example(first["examples"][HAMLET][0])
    assert example["appearances"][0]["step"] == first["step"] and example["appearances"][0]["classes"] == [HAMLET]
    assert set(example["appearances"][0]["layers"]) <= set(hamlet["layers_touched"])
    with pytest.raises(AuditError, match="no such layer"):
        ledger.layer("blocks.9")
    with pytest.raises(AuditError, match="no class or node of this run.s 5 classes and 4 nodes is called that"):
        ledger.for_class("gutenberg/opera")


def test_audit_command_line(policy_run, tmp_path):
    from conftest import smalti_cli

    result = smalti_cli("audit", str(policy_run), "--class", "gutenberg/poetry", "--json")
    assert result.returncode == 0, result.stderr
    assert "tok_emb" in json.loads(result.stdout)["layers_never_touched"]
    assert "tok_emb" in smalti_cli("audit", str(policy_run), "--layer", "tok_emb").stdout
    bad = smalti_cli("audit", str(policy_run), "--layer", "nope")
    assert bad.returncode != 0 and "--layer 'nope': no such layer" in bad.stderr
    run = _copy_run(policy_run, tmp_path)
    with sqlite3.connect(run / "ledger.sqlite") as db:
        db.execute("DELETE FROM entries WHERE idx = 4")
    refused = smalti_cli("audit", str(run), "--layer", "tok_emb")
    assert refused.returncode != 0 and "failed verification" in refused.stderr


def test_the_run_entry_records_what_the_policy_allowed(policy_run):
    """Per class and layer, from the policy's text alone: poetry never reaches tok_emb, Hamlet only its adapter."""
    from smalti.governance.ledger.audit import Ledger

    ledger = Ledger.load(policy_run)
    (phase,) = ledger.run["routing"]  # no rule has a phase: one phase for the whole run
    assert phase["start_batch"] == 0
    classes, layers = ledger.run["classes"], ledger.layer_names
    allowed = {c: dict(zip(layers, row)) for c, row in zip(classes, phase["layers"])}
    for layer in layers:
        adapter = ".adapters." in layer
        assert allowed[HAMLET][layer] == ("1" if adapter else "0"), layer
        assert allowed[TEMPEST][layer] == ("0" if adapter else "1"), layer
        assert allowed[SONNETS][layer] == ("0" if adapter or layer == "tok_emb" else "1"), layer


def test_the_report_shows_what_governed_the_run(policy_run, tmp_path):
    from smalti.governance.ledger.audit import Ledger
    from smalti.workflows.report import write_report
    from smalti.governance.ledger.verify import verify_ledger
    from smalti.software import software

    page = write_report(policy_run, tmp_path / "r.html", verify_ledger(policy_run)).read_text()
    versions = software()
    assert f"smalti {versions['smalti']} (torch {versions['torch']}" in page  # the run's and the report's software
    assert "tiny version 1" in page and "Taxonomy tiny: authorities" in page  # dataset and taxonomy by name
    trainer_id = Ledger.load(policy_run).run["trainer_key"]
    assert f"<code>{trainer_id}</code> (signs this ledger)" in page  # the trainer authority, by name in its row
    assert "comedy-tagger" in page and "model-risk" in page
    assert "tok_emb.*" in page and "gutenberg/poetry" in page and "@adapter" in page  # the policy's rules
    assert "What the policy allowed, per phase" in page and "class='n'>✗" in page
    # smalti policy check shows the same groups, numbered and named alike (they differed), names never cut at 80
    import re

    from conftest import smalti_cli

    checked = smalti_cli("policy", "check", str(policy_run.parent / "policy.yaml"), "--recipe",
                         str(policy_run / "recipe.yaml"), env={"COLUMNS": "80"})
    assert checked.returncode == 0, checked.stderr
    in_report = re.findall(r"<th>\((\d)\) ([^<]+)</th>", page.split("What the policy allowed")[1])
    in_terminal = re.findall(r"^  \((\d)\) (.+)$", checked.stdout, re.M)
    assert in_report and [n for n, _ in in_report] == [n for n, _ in in_terminal][: len(in_report)]
    legend = dict(in_terminal)
    for number, label in in_report:  # the report's header names the members its legend lists
        assert all(name.strip() in legend[number] for name in label.split(",")), (number, label, legend[number])
    assert "…" not in checked.stdout
    held_out = page.split("Held-out loss per class")[1].split("</table>")[0]
    for leaf in ("hamlet", "macbeth", "tempest", "sonnets"):
        assert f"<td>{leaf}</td>" in held_out
    # A copied policy that is not the one the ledger records is not shown as if it were.
    import shutil

    run = tmp_path / "run"
    shutil.copytree(policy_run, run)
    (run / "evidence" / "policy.yaml").write_text("policy: forged\ndefault: allow\nrules: []\n")
    forged = write_report(run, tmp_path / "forged.html", verify_ledger(run)).read_text()
    assert "policy.yaml is not the document the ledger records" in forged and "forged" not in forged.split("<h2>")[0]


LAYOUT_PROBE = """<script>
window.addEventListener("load", () => {
  const heat = document.querySelector("#heatmap svg");
  const labels = [...heat.querySelectorAll("text")].map(t => {
    const box = t.getBoundingClientRect();
    return [t.textContent.trim(), box.left, box.right];
  });
  const out = document.createElement("pre");
  out.id = "layout";
  out.textContent = JSON.stringify({width: window.innerWidth, scroll: document.documentElement.scrollWidth,
                                    heatmap: heat.getBoundingClientRect().right, labels});
  document.body.appendChild(out);
});
</script>"""


def test_the_report_renders_in_headless_chromium(policy_run, tmp_path):
    """At 1280 pixels: nothing scrolls sideways, and every class's row label of the heatmap is on screen."""
    import shutil
    import subprocess

    import matplotlib.image

    from conftest import smalti_cli
    from smalti.governance.ledger.audit import Ledger

    folder = tmp_path / ("a-folder-with-a-long-name-" * 4)  # a path longer than a line: printed unbroken
    folder.mkdir()
    report = folder / "report.html"
    result = smalti_cli("audit", str(policy_run), "--report", str(report))
    assert result.returncode == 0 and str(report) in result.stdout
    page = report.read_text()
    assert "VERIFIED" in page and not re.search(r'(src|href)="(https?:)?//', page)  # nothing to fetch
    for figure in ("heatmap", "updates", "composition", "entropy"):
        assert f'<figure id="{figure}">' in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("SMALTI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (make test installs it) but is not on PATH")
        pytest.skip("no chromium on this machine (make test installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2000"]
    probed = folder / "probed.html"
    probed.write_text(page.replace("</body>", LAYOUT_PROBE + "</body>"))
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<svg") >= 4, "the browser did not parse the plots"
    layout = json.loads(html_lib.unescape(re.search(r'<pre id="layout">(.*?)</pre>', dom.stdout, re.S).group(1)))
    assert layout["width"] == 1280 and layout["scroll"] <= layout["width"], layout  # no horizontal overflow
    assert layout["heatmap"] <= layout["width"]
    classes = Ledger.load(policy_run).run["classes"]
    leaves = [c for c in classes if not any(other.startswith(c + "/") for other in classes)]
    assert len(leaves) == 5
    visible = {text: (left, right) for text, left, right in layout["labels"]}
    for name in leaves:
        label = "/".join(name.split("/")[-2:])  # e.g. tragedy/hamlet
        assert label in visible, f"no row label for {name} in the heatmap"
        left, right = visible[label]
        assert 0 <= left and right <= layout["width"], (name, left, right)

    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags[:-1], f"--screenshot={shot}", "--window-size=1280,5000", report.as_uri()],
                   capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (5000, 1280)
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.3  # plots; text and tables are grey
    assert colourful.mean() > 0.02, "the screenshot shows no plots"


@pytest.mark.parametrize("rows_per_class", [[1, 1, 1], [2, 1, 3]], ids=["uniform", "ragged"])
def test_entropy_profile_matches_an_independent_svd(rows_per_class):
    """Each class's tokens at each representation layer, evenly spaced, against numpy's SVD."""
    import numpy as np
    import torch

    from smalti.core.batch import Batch
    from smalti.governance.ledger.entropy import EntropyProbe
    from smalti.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=17, n_layer=2, n_head=2, d_model=16, block_size=12))
    classes = [c for c, n in enumerate(rows_per_class) for _ in range(n)]
    inputs = torch.randint(0, 17, (len(classes), 12))
    probe = Batch(inputs=inputs, targets=inputs, sample_ids=torch.arange(len(classes)),
                  provenance=torch.tensor(classes)[:, None])
    tokens = 10
    measured = EntropyProbe(model, probe, ["a", "b", "c"], tokens_per_class=tokens).measure().numpy()

    outputs = {}
    layers = model.representation_layers()
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out.detach()))
             for name, m in layers.items()]
    model.eval()
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    for j, name in enumerate(layers):
        for c in range(3):
            x = outputs[name].numpy()[np.array(classes) == c].reshape(-1, 16).astype(np.float64)
            if x.shape[0] > tokens:
                x = x[np.round(np.linspace(0, x.shape[0] - 1, tokens)).astype(int)]
            s = np.linalg.svd(x, compute_uv=False)
            p = s**2 / (s**2).sum()
            p = p[p > 0]
            expected = -(p * np.log(p)).sum() / np.log(max(2, min(x.shape)))
            assert measured[c, j] == pytest.approx(expected, abs=2e-4), (name, c)
