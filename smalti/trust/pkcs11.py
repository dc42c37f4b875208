"""Signing keys kept in a PKCS#11 token (an HSM, a smart card, SoftHSM), named by RFC 7512 URIs.

Wherever Smalti takes a private key file it also takes ``pkcs11:token=LABEL;object=LABEL``: the key never
leaves the token, which signs (Ed25519, ``CKM_EDDSA``) on Smalti's behalf. The URI's query may give
``pin-value`` and ``module-path``; otherwise ``SMALTI_PKCS11_PIN`` and ``SMALTI_PKCS11_MODULE`` are read,
and the module defaults to SoftHSM2's. ``smalti keys new NAME --dir DIR --in URI`` makes the key pair in
the token and writes only ``NAME.pub``.

Why python-pkcs11: a maintained binding of the PKCS#11 C API with EdDSA support; Smalti adds only the
URI parsing RFC 7512 asks for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from smalti.trust.public import PublicKey, SignatureError

MODULE_ENV, PIN_ENV = "SMALTI_PKCS11_MODULE", "SMALTI_PKCS11_PIN"
DEFAULT_MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
ED25519_PARAMS = bytes.fromhex("06032b6570")  # the DER OID 1.3.101.112 (id-Ed25519): CKA_EC_PARAMS


def is_uri(location: str | Path) -> bool:
    return str(location).startswith("pkcs11:")


@dataclass(frozen=True)
class Pkcs11Uri:
    """The parts of an RFC 7512 URI Smalti uses."""

    token: str
    object: str
    pin: str | None
    module: str | None

    @classmethod
    def parse(cls, uri: str) -> "Pkcs11Uri":
        if not is_uri(uri):
            raise SignatureError(f"{uri}: not a pkcs11: URI")
        path, _, query = uri[len("pkcs11:") :].partition("?")
        attributes: dict[str, str] = {}
        options: dict[str, str] = {}
        for part, into in ((path, attributes), (query, options)):
            for item in filter(None, part.split(";" if into is attributes else "&")):
                name, sep, value = item.partition("=")
                if not sep:
                    raise SignatureError(f"{uri}: attribute {item!r} has no value (RFC 7512: name=value)")
                into[name] = unquote(value)
        missing = [name for name in ("token", "object") if name not in attributes]
        if missing:
            raise SignatureError(f"{uri}: needs {' and '.join(missing)} (e.g. pkcs11:token=smalti;object=trainer)")
        return cls(attributes["token"], attributes["object"], options.get("pin-value"), options.get("module-path"))


def _session(uri: Pkcs11Uri, write: bool = False):
    try:
        import pkcs11
    except ImportError:
        raise SignatureError("keys in a PKCS#11 token need the pkcs11 extra: pip install 'smalti[pkcs11]'") from None
    module = uri.module or os.environ.get(MODULE_ENV) or next((m for m in DEFAULT_MODULES if Path(m).is_file()), None)
    if module is None:
        raise SignatureError(f"no PKCS#11 module: give module-path in the URI or set {MODULE_ENV}")
    pin = uri.pin or os.environ.get(PIN_ENV)
    if pin is None:
        raise SignatureError(f"the token {uri.token!r} needs a PIN: pin-value in the URI or {PIN_ENV}")
    try:
        token = pkcs11.lib(module).get_token(token_label=uri.token)
        return token.open(user_pin=pin, rw=write)
    except pkcs11.exceptions.NoSuchToken:
        raise SignatureError(f"no PKCS#11 token labelled {uri.token!r} in {module}") from None
    except pkcs11.exceptions.PinIncorrect:
        raise SignatureError(f"the PIN for token {uri.token!r} is wrong") from None
    except (pkcs11.exceptions.PKCS11Error, RuntimeError, OSError) as error:
        raise SignatureError(f"PKCS#11 token {uri.token!r} ({module}): {type(error).__name__} {error}") from None


def _public_from_point(point: bytes) -> PublicKey:
    """CKA_EC_POINT of an Ed25519 key: the 32 bytes, DER-wrapped in an OCTET STRING by most tokens."""
    if len(point) == 34 and point[:2] == b"\x04\x20":
        point = point[2:]
    if len(point) != 32:
        raise SignatureError(f"the token's public key is not an Ed25519 point ({len(point)} bytes)")
    return PublicKey(point)


class Pkcs11SigningKey:
    """A ``SigningKey`` whose private half stays in the token."""

    def __init__(self, uri: str) -> None:
        import pkcs11
        from pkcs11 import Attribute, KeyType, ObjectClass

        self.uri = Pkcs11Uri.parse(uri)
        self._session = _session(self.uri)
        try:
            self._private = self._session.get_key(ObjectClass.PRIVATE_KEY, KeyType.EC_EDWARDS, label=self.uri.object)
            public = self._session.get_key(ObjectClass.PUBLIC_KEY, KeyType.EC_EDWARDS, label=self.uri.object)
        except pkcs11.exceptions.NoSuchKey:
            raise SignatureError(
                f"{uri}: no Ed25519 key pair labelled {self.uri.object!r} in token {self.uri.token!r}"
            ) from None
        except pkcs11.exceptions.MultipleObjectsReturned:
            raise SignatureError(f"{uri}: more than one key labelled {self.uri.object!r}") from None
        self.public = _public_from_point(public[Attribute.EC_POINT])

    def sign(self, message: bytes) -> bytes:
        from pkcs11 import Mechanism

        return bytes(self._private.sign(message, mechanism=Mechanism.EDDSA))

    def private_pem(self) -> bytes:
        raise SignatureError(f"{self.uri.object}: a key in a PKCS#11 token cannot be exported")


P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # the DER OID 1.2.840.10045.3.1.7 (prime256v1)


def generate(uri: str, kind: str = "ed25519") -> PublicKey | str:
    """Make a key pair inside the token (private half sensitive and not extractable): Ed25519 (every Smalti
    signature; returns the public key) or ECDSA P-256 (OpenSSF model signing; returns the public key as PEM)."""
    from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

    parsed = Pkcs11Uri.parse(uri)
    session = _session(parsed, write=True)
    try:
        if list(session.get_objects({Attribute.LABEL: parsed.object, Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
            raise SignatureError(
                f"{uri}: the token already holds a key labelled {parsed.object!r}; refusing to add another"
            )
        edwards = kind == "ed25519"
        public, _ = session.generate_keypair(
            KeyType.EC_EDWARDS if edwards else KeyType.EC,
            store=True,
            label=parsed.object,
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN if edwards else Mechanism.EC_KEY_PAIR_GEN,
            public_template={Attribute.EC_PARAMS: ED25519_PARAMS if edwards else P256_PARAMS, Attribute.VERIFY: True},
            private_template={Attribute.SIGN: True, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False},
        )
        if edwards:
            return _public_from_point(public[Attribute.EC_POINT])
        return _p256_pem(public[Attribute.EC_POINT])
    finally:
        session.close()


def _p256_pem(point: bytes) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if len(point) == 67 and point[:2] == b"\x04\x41":  # DER OCTET STRING around the uncompressed point
        point = point[2:]
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def with_module_and_pin(uri: str) -> str:
    """The URI with ``module-path`` and ``pin-value`` filled in from the environment where it has none, for
    libraries that read them only from the URI (model_signing's PKCS#11 signer); kept in this process."""
    from urllib.parse import quote

    parsed = Pkcs11Uri.parse(uri)
    module = (
        parsed.module or os.environ.get(MODULE_ENV) or next((m for m in DEFAULT_MODULES if Path(m).is_file()), None)
    )
    pin = parsed.pin or os.environ.get(PIN_ENV)
    extra = [f"module-path={quote(module, safe='/')}"] if module and not parsed.module else []
    extra += [f"pin-value={quote(pin, safe='')}"] if pin and not parsed.pin else []
    if not extra:
        return uri
    return uri + ("&" if "?" in uri else "?") + "&".join(extra)
