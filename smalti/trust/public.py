"""An authority's public key and the error every failed check raises: what a verifier needs, and all that
``smalti.trust.pkcs11`` needs of ``smalti.trust.keys`` (so neither imports the other in a cycle)."""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from smalti.errors import SmaltiError

PUBLIC_PREFIX = "ed25519:"


class SignatureError(SmaltiError):
    """A key, or a signature, is missing, malformed, or does not verify."""


@dataclass(frozen=True)
class PublicKey:
    raw: bytes

    @classmethod
    def parse(cls, text: str, where: str = "public key") -> "PublicKey":
        text = text.strip()
        if not text.startswith(PUBLIC_PREFIX):
            raise SignatureError(f"{where}: expected 'ed25519:<base64>', got {text[:24]!r}")
        try:
            raw = base64.b64decode(text[len(PUBLIC_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError(f"{where}: public key is not valid base64") from None
        if len(raw) != 32:
            raise SignatureError(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
        return cls(raw)

    @classmethod
    def load(cls, path: str | Path) -> "PublicKey":
        path = Path(path)
        if not path.is_file():
            raise SignatureError(f"{path}: public key file not found")
        lines = [
            line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")
        ]
        if len(lines) != 1:
            raise SignatureError(f"{path}: expected one line 'ed25519:<base64>'")
        return cls.parse(lines[0], where=str(path))

    @property
    def text(self) -> str:
        return PUBLIC_PREFIX + base64.b64encode(self.raw).decode("ascii")

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True
