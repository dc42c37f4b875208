"""Ed25519 keys and detached signatures for the authorities that govern a run.

Formats, chosen to be readable and checkable without Smalti:

- private key: ``NAME.key``, PKCS#8 PEM, file mode 0600;
- public key: ``NAME.pub``, one line ``ed25519:<base64 of the 32 raw bytes>``;
- key id: the first 16 hex digits of sha256(raw public key);
- detached signature: ``FILE.sig``, JSON ``{"algorithm": "ed25519", "key_id": ...,
  "signature": <base64>}`` over the exact bytes of FILE (``openssl pkeyutl
  -verify -rawin`` checks it with the same key).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smalti.trust.pkcs11 import Pkcs11SigningKey
from smalti.trust.public import PublicKey, SignatureError


class SigningKey:
    """An authority's private key. Only ever read from a 0600 file or made fresh."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = PublicKey(
            key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        )

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "SigningKey":
        """A private key file, or a key in a PKCS#11 token named by its RFC 7512 URI (``pkcs11:token=...;object=...``:
        ``smalti.trust.pkcs11``), which signs the same way and never leaves the token."""
        if str(path).startswith("pkcs11:"):
            return Pkcs11SigningKey(str(path))  # type: ignore[return-value]
        path = Path(path)
        if not path.is_file():
            raise SignatureError(f"{path}: private key file not found")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            raise SignatureError(f"{path}: not a PEM private key (or it is encrypted)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError(f"{path}: not an Ed25519 private key")
        return cls(key)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def private_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def write_key_pair(name: str, directory: str | Path, kind: str = "ed25519") -> tuple[Path, Path]:
    """Write ``NAME.key`` (0600) and ``NAME.pub``; refuses to overwrite an existing key.

    ``kind``: ``ed25519`` (every Smalti signature: taxonomy, manifests, policies, ledger heads) or
    ``ecdsa-p256`` (for OpenSSF model signing, whose library signs with NIST curves only; its public
    key is written as a PEM SubjectPublicKeyInfo, what ``model_signing verify key`` reads)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    if kind not in ("ed25519", "ecdsa-p256"):
        raise SignatureError(f"--type {kind!r}: choose ed25519 or ecdsa-p256")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    for path in (private, public):
        if path.exists():
            raise SignatureError(f"{path}: already exists; refusing to overwrite a key")
    if kind == "ed25519":
        key = SigningKey.generate()
        pem, public_text = key.private_pem(), f"# {name} (key id {key.public.key_id})\n{key.public.text}\n"
    else:
        curve_key = ec.generate_private_key(ec.SECP256R1())
        pem = curve_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_text = (
            curve_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public.write_text(public_text, encoding="utf-8")
    return private, public


@dataclass(frozen=True)
class Signature:
    key_id: str
    value: bytes

    def to_json(self) -> str:
        return (
            json.dumps(
                {
                    "algorithm": "ed25519",
                    "key_id": self.key_id,
                    "signature": base64.b64encode(self.value).decode("ascii"),
                },
                indent=2,
            )
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str, where: str) -> "Signature":
        try:
            data = json.loads(text)
            if data.get("algorithm") != "ed25519":
                raise SignatureError(f"{where}: unsupported signature algorithm {data.get('algorithm')!r}")
            return cls(key_id=str(data["key_id"]), value=base64.b64decode(data["signature"], validate=True))
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise SignatureError(f"{where}: not a Smalti signature file") from None


def signature_path(path: str | Path) -> Path:
    return Path(f"{path}.sig")


def sign_bytes(data: bytes, key: SigningKey) -> Signature:
    return Signature(key_id=key.public.key_id, value=key.sign(data))


def verify_bytes(data: bytes, signature: Signature, public: PublicKey, where: str) -> None:
    """Raise ``SignatureError`` naming ``where`` unless ``signature`` is ``public``'s over ``data``."""
    if signature.key_id != public.key_id:
        raise SignatureError(f"{where}: signed by key {signature.key_id}, expected key {public.key_id}")
    if not public.verify(signature.value, data):
        raise SignatureError(f"{where}: signature does not match the content (altered after signing?)")


def read_signature(path: str | Path) -> Signature:
    sig_path = signature_path(path)
    if not sig_path.is_file():
        raise SignatureError(f"{path}: not signed (no {sig_path.name})")
    return Signature.from_json(sig_path.read_text(encoding="utf-8"), where=str(sig_path))
