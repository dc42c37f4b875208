"""C2SP signed notes and transparency-log checkpoints: the ledger's tree heads in the ecosystem's format.

A checkpoint (c2sp.org/tlog-checkpoint) is a note whose text is the log's origin line, its size, the
base64 root hash, and extension lines; a signed note (c2sp.org/signed-note) adds signature lines
``— <key name> base64(4-byte key ID || Ed25519 signature of the text)``. Any tool of that world
(Go's ``golang.org/x/mod/sumdb/note``, witnesses, tlog clients) checks it with a verifier key
``<name>+<hex key ID>+base64(0x01 || public key)``; ``smalti keys note-key`` prints one.

Smalti's extension lines say what a bare checkpoint cannot: the head's time, whether training had
finished (``final``), and the hash of the model weights it was signed with. Each begins with
``smalti-``, so a generic client skips them and a Smalti reader finds them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Sequence

from smalti.errors import SmaltiError

ED25519 = 0x01
DASH = "\u2014"
MAX_SIGNATURES = 16


class NoteError(SmaltiError):
    """A note or checkpoint that does not parse or verify."""


def key_id(name: str, public: bytes) -> bytes:
    """The 4-byte key ID the signed-note spec recommends: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()[:4]


def check_key_name(name: str) -> str:
    if not name or any(c.isspace() for c in name) or "+" in name:
        raise NoteError(f"key name {name!r}: must be non-empty, without spaces or '+'")
    return name


def verifier_key(name: str, public: bytes) -> str:
    """``name+keyid+base64(0x01 || key)``: how the note world names a key to verify with."""
    check_key_name(name)
    return f"{name}+{key_id(name, public).hex()}+{base64.b64encode(bytes([ED25519]) + public).decode()}"


@dataclass(frozen=True)
class Verifier:
    name: str
    public: bytes

    @property
    def id(self) -> bytes:
        return key_id(self.name, self.public)

    @classmethod
    def parse(cls, text: str) -> "Verifier":
        """A verifier key ``name+hex8+base64``; refuses one whose ID does not match its name and key."""
        parts = text.strip().split("+", 2)  # base64 may hold "+" too
        if len(parts) != 3:
            raise NoteError(f"verifier key {text.strip()[:40]!r}: expected name+keyid+base64key")
        name, hex_id, encoded = parts
        try:
            raw = base64.b64decode(encoded, validate=True)
            wanted = bytes.fromhex(hex_id)
        except (binascii.Error, ValueError):
            raise NoteError(f"verifier key for {name!r}: the key ID or the key is not valid hex/base64") from None
        if len(raw) != 33 or raw[0] != ED25519:
            raise NoteError(f"verifier key for {name!r}: not an Ed25519 key (type 0x01 and 32 bytes)")
        verifier = cls(check_key_name(name), raw[1:])
        if verifier.id != wanted:
            raise NoteError(f"verifier key for {name!r}: key ID {hex_id} does not match the name and key")
        return verifier


def checkpoint_text(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The note text of a checkpoint; extension lines must be non-empty."""
    if not origin or "\n" in origin:
        raise NoteError(f"checkpoint origin {origin!r}: must be one non-empty line")
    if any(not line or "\n" in line for line in extensions):
        raise NoteError("checkpoint extension lines must be non-empty single lines")
    lines = [origin, str(size), base64.b64encode(root).decode(), *extensions]
    return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> "Checkpoint":
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("checkpoint: expected origin, size and root hash lines, each ending in a newline")
        origin, size, root, *extensions = lines[:-1]
        if not size.isdigit() or (size != "0" and size.startswith("0")):
            raise NoteError(f"checkpoint: tree size {size!r} is not a decimal number")
        try:
            digest = base64.b64decode(root, validate=True)
        except binascii.Error:
            raise NoteError("checkpoint: the root hash is not base64") from None
        if len(digest) != 32:
            raise NoteError(f"checkpoint: the root hash has {len(digest)} bytes, not 32")
        return cls(origin, int(size), digest, tuple(extensions))

    def extension(self, key: str) -> str | None:
        """The value of Smalti's extension line ``smalti-<key> <value>``, if present."""
        prefix = f"smalti-{key} "
        return next((line[len(prefix) :] for line in self.extensions if line.startswith(prefix)), None)


def signature_line(name: str, public: bytes, signature: bytes) -> str:
    return f"{DASH} {check_key_name(name)} {base64.b64encode(key_id(name, public) + signature).decode()}\n"


def split_note(note: str) -> tuple[str, list[tuple[str, bytes, bytes]]]:
    """The text and its signatures (name, key ID, signature bytes) of a signed note."""
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note: contains control characters")
    text, separator, signed = note.rpartition("\n\n")
    if not separator or not signed.endswith("\n"):
        raise NoteError("note: no blank line before signature lines ending in a newline")
    signatures = []
    for line in signed[:-1].split("\n"):
        dash, _, rest = line.partition(" ")
        name, _, encoded = rest.partition(" ")
        if dash != DASH or not name or not encoded or " " in encoded:
            raise NoteError(f"note: malformed signature line {line[:60]!r}")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise NoteError(f"note: signature of {name!r} is not base64") from None
        if len(raw) < 5:
            raise NoteError(f"note: signature of {name!r} is too short")
        signatures.append((name, raw[:4], raw[4:]))
    if len(signatures) > MAX_SIGNATURES:
        raise NoteError(f"note: {len(signatures)} signatures, more than {MAX_SIGNATURES}")
    return text + "\n", signatures


def open_note(note: str, verifiers: list[Verifier]) -> tuple[str, list[Verifier]]:
    """The note's text and the known keys that signed it. Unknown keys are ignored (as the spec says); a
    known key whose signature fails, or no known key at all, rejects the note."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    text, signatures = split_note(note)
    known = {(v.name, v.id): v for v in verifiers}
    signed_by = []
    for name, hint, signature in signatures:
        verifier = known.get((name, hint))
        if verifier is None:
            continue
        try:
            Ed25519PublicKey.from_public_bytes(verifier.public).verify(signature, text.encode())
        except InvalidSignature:
            raise NoteError(f"note: the signature of {name} does not verify") from None
        signed_by.append(verifier)
    if not signed_by:
        raise NoteError("note: not signed by any known key")
    return text, signed_by
