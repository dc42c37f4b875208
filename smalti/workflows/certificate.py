"""The signed deletion certificate: written by ``smalti forget``, checked by ``smalti ledger verify``.

Kept apart from the deletion itself so that checking a run's evidence needs no torch
until the one step that reads a checkpoint (the certified final weights' hash).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from smalti import formats
from smalti.trust.keys import PublicKey, SigningKey
from smalti.trust import merkle
from smalti.trust.entry import HEADER_SIZE, TreeHead, decode_entry
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


def ablated_classes(run: Path) -> list[str]:
    """The classes whose adapters this run's deletion certificate says were ablated (reset), none otherwise:
    what an export of the run leaves out, so that no folder named after a deleted class ships."""
    path = Path(run) / CERTIFICATE
    if not path.is_file():
        return []
    try:
        certificate = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(certificate, dict) or certificate.get("mode") != "ablate":
        return []
    classes = certificate.get("classes") or [certificate.get("class")]
    return sorted(str(c) for c in classes if c)


def signed_message(certificate: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in certificate.items() if k not in ("signature", "key_id")}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode()


def sign_certificate(certificate: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    certificate = dict(certificate, key_id=key.public.key_id)
    certificate["signature"] = key.sign(signed_message(certificate)).hex()
    return certificate


def write_certificate(out: Path, certificate: dict[str, Any]) -> Path:
    from smalti.io import atomic_write_bytes

    path = out / CERTIFICATE
    atomic_write_bytes(path, (json.dumps(certificate, indent=1, sort_keys=True) + "\n").encode())
    return path


def _head_ok(head: dict[str, Any], key: PublicKey) -> bool:
    """The head's signature holds and its signed message states its own size, root, time and flag."""
    try:
        return TreeHead.states_itself(head) and key.verify(bytes.fromhex(head["signature"]), head["message"].encode())
    except (KeyError, ValueError, TypeError):
        return False


def verify_certificate(run: str | Path, public_key: PublicKey | None = None) -> str | None:
    """None if the run's deletion certificate holds; else what is wrong, in one line."""
    run = Path(run)
    path = run / CERTIFICATE
    try:
        certificate = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{path}: cannot read the certificate ({error})"
    problem = formats.format_problem(
        certificate.get("version") if isinstance(certificate, dict) else None, formats.DELETION_CERTIFICATE, str(path)
    )
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
    if certificate.get("key_id") != key.key_id or not key.verify(
        bytes.fromhex(certificate.get("signature", "")), signed_message(certificate)
    ):
        return f"{path}: the signature does not verify under trainer key {key.key_id}"
    head = parent.get("head") or {}
    problem = _original_problem(path, "parent", parent_run, head, key)
    if problem:
        return problem
    if certificate["mode"] == "noop":
        return None
    # Through a lineage (smalti.workflows.lineage_deletion): every original run the deletion replaced or
    # checked still holds the head named, and every replacement is the run certified.
    replaced = []
    for link in certificate.get("lineage") or []:
        original = link.get("original") or {}
        problem = _original_problem(path, "lineage", Path(original.get("run_dir", "")), original.get("head") or {}, key)
        if problem:
            return problem
        if "replacement" in link:
            replaced.append(link["replacement"])
    for replacement in replaced[:-1]:  # the last one is this run, checked below
        problem = _run_problem(
            path,
            Path(replacement["run_dir"]),
            replacement["ledger_head"],
            replacement["final_weights_sha256"],
            None,
            key,
        )
        if problem:
            return problem
    starts_from = replaced[-2]["ledger_head"] if len(replaced) >= 2 else head
    return _run_problem(path, run, certificate["ledger_head"], certificate["final_weights_sha256"], starts_from, key)


def _original_problem(path: Path, what: str, run: Path, head: dict[str, Any], key: PublicKey) -> str | None:
    """A run the deletion started from: the head is signed and, where the run is here, its ledger holds it."""
    if not _head_ok(head, key):
        return f"{path}: the {what} tree head of {run} does not verify"
    if ledger_path(run).is_file():
        report = verify_ledger(run, key)
        if not report.ok:
            return f"{path}: the {what} ledger {run} does not verify ({report.problem})"
        store = LedgerStore(ledger_path(run))
        try:
            leaves = store.leaves(stop=int(head["size"]))
        finally:
            store.close()
        if len(leaves) < int(head["size"]) or merkle.root(leaves).hex() != head["root"]:
            return f"{path}: the {what} ledger {run}'s first {head['size']} entries no longer match the certified head"
    return None


def _run_problem(
    path: Path, run: Path, ledger_head: dict[str, Any], weights: str, starts_from: dict[str, Any] | None, key: PublicKey
) -> str | None:
    """A run the deletion wrote: its ledger verifies, ends in the certified head, holds the certified weights
    and (``starts_from``) links that parent head."""
    if not ledger_path(run).is_file():
        return f"{path}: the run {run} has no ledger"
    report = verify_ledger(run, key)
    if not report.ok:
        return f"{path}: the run {run}'s ledger does not verify ({report.problem})"
    genesis, _, heads = ledger_entries(run)
    if starts_from is not None and (genesis.get("parent") or {}).get("head") != starts_from:
        return f"{path}: the run's ledger does not start from the certified parent head"
    if not heads or heads[-1].root.hex() != ledger_head["root"] or heads[-1].size != ledger_head["size"]:
        return f"{path}: the last signed tree head of {run} is not the certified one"
    from smalti.checkpoint import CheckpointStore, load_payload, weights_sha256  # torch: only for the weights

    latest = CheckpointStore(run / "checkpoints", keep=1).latest()
    if latest is None or weights_sha256(load_payload(latest).model or {}) != weights:
        return f"{path}: the final weights of {run} do not match the certified hash"
    return None
