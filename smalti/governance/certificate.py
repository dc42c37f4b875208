"""The signed deletion certificate: written by ``smalti forget``, checked by ``smalti ledger verify``.

Kept apart from the deletion itself so that checking a run's evidence needs no torch
until the one step that reads a checkpoint (the certified final weights' hash).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smalti import formats
from smalti.governance.keys import PublicKey, SigningKey
from smalti.governance.ledger.entry import HEADER_SIZE, TreeHead, decode_entry
from smalti.governance.ledger.store import LedgerStore, ledger_path
from smalti.governance.ledger.verify import verify_ledger

CERTIFICATE = "deletion-certificate.json"


def ledger_entries(run: Path, tables: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]], list[TreeHead]]:
    """Every entry's content. Callers verify the ledger first (leaves, chain, signed heads), so the
    bodies' canonical spelling is not checked again here; ``tables=False`` leaves the per-layer
    tables packed (a plan reads only which examples each step had: ten times faster)."""
    store = LedgerStore(ledger_path(run))
    try:
        if tables:
            bodies = [decode_entry(data, canonical=False).body for _, _, _, data in store.rows()]
        else:
            bodies = [json.loads(data[HEADER_SIZE:]) for _, _, _, data in store.rows()]
        heads = store.heads()
    finally:
        store.close()
    return bodies[0], bodies[1:], heads


def _message(certificate: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in certificate.items() if k not in ("signature", "key_id")}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign_certificate(certificate: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    certificate = dict(certificate, key_id=key.public.key_id)
    certificate["signature"] = key.sign(_message(certificate)).hex()
    return certificate


def write_certificate(out: Path, certificate: dict[str, Any]) -> Path:
    from smalti.io import atomic_write_bytes

    path = out / CERTIFICATE
    atomic_write_bytes(path, (json.dumps(certificate, indent=1, sort_keys=True) + "\n").encode())
    return path


def _head_ok(head: dict[str, Any], key: PublicKey) -> bool:
    """The head's signature holds and its signed message states its own size, root, time and flag."""
    try:
        message = json.loads(head["message"])
        same = all(message[k] == head[k] for k in ("size", "root", "timestamp", "final"))
        return same and key.verify(bytes.fromhex(head["signature"]), head["message"].encode())
    except (KeyError, ValueError, TypeError):
        return False


def verify_certificate(run: str | Path, public_key: PublicKey | None = None) -> str | None:
    """None if the run's deletion certificate holds; else what is wrong, in one line."""
    from smalti.governance.ledger import merkle

    run = Path(run)
    path = run / CERTIFICATE
    try:
        certificate = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path}: cannot read the certificate ({error})"
    problem = formats.format_problem(certificate.get("version") if isinstance(certificate, dict) else None,
                                     formats.DELETION_CERTIFICATE, str(path))
    if problem:
        return problem
    parent = certificate.get("parent") or {}
    parent_run = Path(parent.get("run_dir", ""))
    key = public_key
    if key is None:
        store = LedgerStore(ledger_path(parent_run)) if ledger_path(parent_run).is_file() else None
        if store is None:
            return f"{path}: no --pubkey and the parent ledger {parent_run} is not there to name the trainer key"
        key = PublicKey.parse(store.get_meta("trainer_public_key") or "", f"{parent_run} trainer key")
        store.close()
    if certificate.get("key_id") != key.key_id or not key.verify(bytes.fromhex(certificate.get("signature", "")),
                                                                  _message(certificate)):
        return f"{path}: the signature does not verify under trainer key {key.key_id}"
    head = parent.get("head") or {}
    if not _head_ok(head, key):
        return f"{path}: the parent tree head's signature does not verify"
    if ledger_path(parent_run).is_file():  # the parent is here: its ledger must still hold that head
        report = verify_ledger(parent_run, key)
        if not report.ok:
            return f"{path}: the parent ledger {parent_run} does not verify ({report.problem})"
        store = LedgerStore(ledger_path(parent_run))
        try:
            leaves = store.leaves(stop=int(head["size"]))
        finally:
            store.close()
        if len(leaves) < int(head["size"]) or merkle.root(leaves).hex() != head["root"]:
            return f"{path}: the parent ledger's first {head['size']} entries no longer match the certified head"
    if certificate["mode"] == "noop":
        return None
    if not ledger_path(run).is_file():
        return f"{path}: the run has no ledger"
    report = verify_ledger(run, key)
    if not report.ok:
        return f"{path}: the run's ledger does not verify ({report.problem})"
    genesis, _, heads = ledger_entries(run)
    if (genesis.get("parent") or {}).get("head") != head:
        return f"{path}: the run's ledger does not start from the certified parent head"
    if not heads or heads[-1].root.hex() != certificate["ledger_head"]["root"] or heads[-1].size != certificate["ledger_head"]["size"]:
        return f"{path}: the run's last signed tree head is not the certified one"
    from smalti.governance.deletion import _latest, _load, weights_sha256  # torch: only for a certificate's weights

    final = _load(_latest(run))["model"]
    if weights_sha256(final) != certificate["final_weights_sha256"]:
        return f"{path}: the final weights do not match the certified hash"
    return None
