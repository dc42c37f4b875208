"""An auditor as a witness: cosign a published ledger's checkpoint only if it extends what was cosigned before.

A witness keeps, per log, the last checkpoint it cosigned. Shown a new one, it checks the log's
signature, then that the new tree contains the old one (an RFC 6962 consistency proof computed from the
log's tiles), and only then adds a C2SP tlog-cosignature (c2sp.org/tlog-cosignature, Ed25519 type
0x04): a note signature by the witness's key over ``cosignature/v1``, ``time <POSIX seconds>`` and the
checkpoint text, prefixed by the timestamp. A trainer that rewrites history after a witness saw it
cannot get that witness's cosignature again: the split view is caught by any witness that saw the old
checkpoint. The auditor turns from a reader into a co-guarantor.

State (``--state DIR``), one pair of files per log, written atomically::

    <origin>.log-key      the log's verifier key, fixed at the first cosignature
    <origin>.checkpoint   the last checkpoint cosigned, with its cosignature
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.trust import merkle
from smalti.trust.note import DASH, Checkpoint, NoteError, Verifier, check_key_name, open_note, split_note
from smalti.governance.ledger.tiles import PublishedLog, PublishError
from smalti.io import atomic_write_bytes

COSIGNATURE = 0x04


class WitnessError(SmaltiError):
    """A checkpoint this witness will not cosign, or a cosignature that does not hold."""


def cosigner_key_id(name: str, public: bytes) -> bytes:
    """SHA-256(name || 0x0A || 0x04 || key)[:4]: the key ID of an Ed25519 cosignature."""
    return hashlib.sha256(check_key_name(name).encode() + b"\n" + bytes([COSIGNATURE]) + public).digest()[:4]


def cosigned_message(text: str, timestamp: int) -> bytes:
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


def cosignature_line(text: str, name: str, key: SigningKey, timestamp: int) -> str:
    signature = key.sign(cosigned_message(text, timestamp))
    raw = cosigner_key_id(name, key.public.raw) + struct.pack(">Q", timestamp) + signature
    return f"{DASH} {name} {base64.b64encode(raw).decode()}\n"


@dataclass(frozen=True)
class Cosignature:
    name: str
    timestamp: int


def cosignatures(note: str, witness: PublicKey) -> list[Cosignature]:
    """The valid cosignatures by ``witness`` on ``note`` (under whatever name each line gives: the key ID
    binds it); a line of this key whose signature fails raises."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text, lines = split_note(note)
    found = []
    for name, key_id, raw in lines:
        try:
            if key_id != cosigner_key_id(name, witness.raw):
                continue
        except NoteError:
            continue
        if len(raw) != 8 + 64:
            raise WitnessError(f"cosignature of {name}: {len(raw) + 4} bytes, an Ed25519 cosignature has 76")
        (timestamp,) = struct.unpack(">Q", raw[:8])
        try:
            Ed25519PublicKey.from_public_bytes(witness.raw).verify(raw[8:], cosigned_message(text, timestamp))
        except InvalidSignature:
            raise WitnessError(f"the cosignature of {name} does not verify") from None
        found.append(Cosignature(name, timestamp))
    return found


def _state_paths(state: Path, origin: str) -> tuple[Path, Path]:
    stem = origin.replace("/", "_")
    return state / f"{stem}.log-key", state / f"{stem}.checkpoint"


def cosign(
    url: str,
    key: SigningKey,
    name: str,
    state: Path,
    log_key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    write_back: bool = True,
) -> dict[str, Any]:
    """Check the log at ``url`` against this witness's state and cosign its checkpoint; what was done."""
    log = PublishedLog(url, storage_options)
    fetched = log.read("checkpoint").decode("utf-8", errors="replace")
    try:
        origin = fetched.split("\n", 1)[0]
        log_key_path, checkpoint_path = _state_paths(state, check_key_name(origin))
    except NoteError as error:
        raise WitnessError(f"{url}/checkpoint: {error}") from None
    known = log_key_path.read_text().strip() if log_key_path.is_file() else None
    if known is not None and log_key is not None and log_key.strip() != known:
        raise WitnessError(f"--log-key differs from the key {state} holds for {origin}; a log's key does not change")
    if known is None and log_key is None:
        raise WitnessError(
            f"first cosignature of {origin}: pass --log-key (smalti ledger checkpoint RUN --verifier-key)"
        )
    verifier = Verifier.parse(known or log_key or "")
    if verifier.name != origin:
        raise WitnessError(f"{url}/checkpoint: origin {origin!r}, the log key is {verifier.name!r}'s")
    try:
        text, _ = open_note(fetched, [verifier])
        new = Checkpoint.parse(text)
    except NoteError as error:
        raise WitnessError(f"{url}/checkpoint: {error}") from None
    old = None
    if checkpoint_path.is_file():
        old = Checkpoint.parse(open_note(checkpoint_path.read_text(), [verifier])[0])
        if new.size < old.size:
            raise WitnessError(
                f"{origin}: the log shows size {new.size}, smaller than size {old.size} this witness "
                f"cosigned: refusing (a log only grows)"
            )
        if new.size == old.size and new.root != old.root:
            raise WitnessError(
                f"{origin}: a different root at size {new.size} than the one this witness cosigned: "
                "a split view; refusing"
            )
        if new.size > old.size:
            try:
                proof = log.consistency_proof(old.size, new.size)
            except PublishError as error:
                raise WitnessError(f"{origin}: cannot build a consistency proof from the tiles ({error})") from None
            if not merkle.verify_consistency(old.size, new.size, proof, old.root, new.root):
                raise WitnessError(
                    f"{origin}: size {new.size} is not consistent with size {old.size} this witness "
                    "cosigned: history was rewritten (a split view); refusing"
                )
    stamp = int(time.time())
    others = "".join(
        line + "\n" for line in fetched.split("\n\n")[-1].splitlines() if not line.startswith(f"{DASH} {name} ")
    )  # an earlier cosignature of ours is replaced
    cosigned = text + "\n" + others + cosignature_line(text, name, key, stamp)
    state.mkdir(parents=True, exist_ok=True)
    if known is None:
        atomic_write_bytes(log_key_path, (log_key or "").strip().encode() + b"\n")
    atomic_write_bytes(checkpoint_path, cosigned.encode())
    written_back = False
    if write_back:
        try:  # only over the checkpoint we checked: a log that moved on keeps its newer one
            if log.read("checkpoint").decode("utf-8", errors="replace") == fetched:
                log.write("checkpoint", cosigned.encode())
                written_back = True
        except PublishError:
            written_back = False
    return {
        "origin": origin,
        "size": new.size,
        "previous_size": old.size if old else None,
        "timestamp": stamp,
        "checkpoint": cosigned,
        "written_back": written_back,
    }


def check_witnessed(run: Path, cosigned_note: str, witness: PublicKey) -> str:
    """Check that ``run``'s ledger was cosigned by ``witness``: the note must be the run's checkpoint
    (the trainer's signature under its origin), cosigned by the witness, for a tree this ledger holds (its
    root at that size); returns a one-line description, raises ``WitnessError`` otherwise."""
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    store = LedgerStore(ledger_path(run))
    try:
        origin, trainer = store.origin, store.trainer_key
        leaves = store.leaves()
    finally:
        store.close()
    try:
        text, _ = open_note(cosigned_note, [Verifier(origin, trainer.raw)])
        checkpoint = Checkpoint.parse(text)
    except NoteError as error:
        raise WitnessError(f"the cosigned checkpoint is not this run's ({origin}): {error}") from None
    found = cosignatures(cosigned_note, witness)
    if not found:
        raise WitnessError(
            f"no cosignature by witness key {witness.key_id} on the checkpoint at size {checkpoint.size}"
        )
    if checkpoint.size > len(leaves) or merkle.root(leaves[: checkpoint.size]) != checkpoint.root:
        raise WitnessError(
            f"the witnessed checkpoint at size {checkpoint.size} does not match this ledger: the ledger "
            "differs from what the witness saw"
        )
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(found[0].timestamp))
    return f"witnessed by {found[0].name} at size {checkpoint.size} ({when})"
