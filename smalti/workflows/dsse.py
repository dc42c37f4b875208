"""DSSE envelopes of in-toto statements, signed and opened with securesystemslib (the in-toto project's library).

Shared by every signed statement Smalti writes: the trainer's provenance of an exported model
(``smalti.workflows.provenance``) and an evaluator's attestation (``smalti.evaluation.attestation``). The DSSE
``keyid`` is the key id Smalti prints (the first 16 hex digits of the key's sha256).
"""

from __future__ import annotations

import json
from typing import Any

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"


class EnvelopeError(SmaltiError):
    """An envelope that is not one the given key signed over an in-toto statement."""


def sign_envelope(payload: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    """A DSSE envelope of the statement, signed with securesystemslib (the in-toto project's signing library)."""
    from securesystemslib.dsse import Envelope

    envelope = Envelope(json.dumps(payload, sort_keys=True).encode(), PAYLOAD_TYPE, {})
    envelope.sign(_Signer(key))  # type: ignore[arg-type]  # _Signer has the Signer interface, not its ABC as base
    return envelope.to_dict()


class _Signer:
    """securesystemslib's signer interface over any Smalti key (a file's, or a PKCS#11 token's); the keyid is
    the key id Smalti prints."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self.public_key = _sslib_key(key.public)

    def sign(self, payload: bytes):
        from securesystemslib.signer import Signature

        return Signature(self.public_key.keyid, self.key.sign(payload).hex())


def _sslib_key(public: PublicKey):
    from securesystemslib.signer import SSlibKey

    return SSlibKey(public.key_id, "ed25519", "ed25519", {"public": public.raw.hex()})


def open_envelope(envelope: dict[str, Any], key: PublicKey, role: str = "") -> dict[str, Any]:
    """The statement in a DSSE envelope, after checking ``key`` (the ``role``'s, for messages) signed it."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError

    try:
        parsed = Envelope.from_dict(envelope)
        parsed.verify([_sslib_key(key)], 1)
    except (VerificationError, KeyError, ValueError, TypeError) as error:
        raise EnvelopeError(f"not signed by {role + ' ' if role else ''}key {key.key_id} ({error})") from None
    if parsed.payload_type != PAYLOAD_TYPE:
        raise EnvelopeError(f"payload type {parsed.payload_type!r}, not an in-toto statement")
    statement = json.loads(parsed.payload)
    if not isinstance(statement, dict):
        raise EnvelopeError("the payload is not a JSON object")
    return statement
