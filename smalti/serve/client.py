"""An auditor's client for ``smalti serve``: signed requests, sign-in codes, and checks made on the auditor's side.

Every request is signed with HTTP Message Signatures (RFC 9421, by the ``http-message-signatures`` library)
over ``@method`` and ``@target-uri`` for the service's origin, with a fresh nonce and time, by the auditor's
key (a file, or a PKCS#11 token: the key never leaves it). What the service answers is *not* trusted: the
checks here (``verified_checkpoint``, ``verify_inclusion``, ``verify_entries``) recompute from the bytes,
against the trainer key the auditor brings, never against a key the service names.
"""

from __future__ import annotations

import base64
import datetime
import struct
import uuid
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smalti.errors import SmaltiError
from smalti.governance.keys import PublicKey, SigningKey
from smalti.governance.ledger import merkle
from smalti.governance.ledger.entry import HEADER_SIZE, decode_entry
from smalti.governance.ledger.note import Checkpoint, NoteError, Verifier, open_note
from smalti.serve.auth import TAG, login_message


class RemoteError(SmaltiError):
    """The service refused, or answered something that does not check out."""


class _TokenBackedKey(Ed25519PrivateKey):
    """A Smalti signing key (a file's or a token's) in the shape the signature library takes: only ``sign``."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def public_key(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        return Ed25519PublicKey.from_public_bytes(self._key.public.raw)

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        raise TypeError("this key signs only; its bytes are not available")

    def private_bytes_raw(self) -> bytes:
        raise TypeError("this key signs only; its bytes are not available")

    def __copy__(self) -> "_TokenBackedKey":
        return self

    def __deepcopy__(self, memo: dict) -> "_TokenBackedKey":
        return self


class AuditClient:
    """``AuditClient("https://audit.example", SigningKey.load("auditor.key")).json("/api/runs")``."""

    def __init__(self, origin: str, key: SigningKey, timeout: float = 60.0, tls_verify: bool | str = True) -> None:
        try:
            import requests
            from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms
        except ImportError:
            raise RemoteError("the auditor client needs the serve extra: pip install 'smalti[serve]'") from None
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"{origin!r}: expected the service's origin, e.g. https://audit.example")
        self.origin, self.key, self.timeout = f"{parts.scheme}://{parts.netloc}", key, timeout
        signing = _TokenBackedKey(key)

        class Keys(HTTPSignatureKeyResolver):
            def resolve_private_key(self, key_id: str) -> Any:
                return signing

        self._signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=Keys())
        self.session = requests.Session()
        self.session.verify = tls_verify
        self._requests = requests

    # ---------------------------------------------------------------- requests

    def request(self, method: str, path: str, params: dict[str, Any] | None = None, sign: bool = True,
                **kwargs: Any) -> Any:
        prepared = self._requests.Request(method, self.origin + path, params=params, **kwargs).prepare()
        if sign:
            self._signer.sign(prepared, key_id=self.key.public.key_id, covered_component_ids=("@method", "@target-uri"),
                              tag=TAG, nonce=uuid.uuid4().hex, created=datetime.datetime.now(datetime.timezone.utc))
        try:
            return self.session.send(prepared, timeout=self.timeout)
        except self._requests.RequestException as error:
            raise RemoteError(f"{self.origin}: {type(error).__name__}: {error}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params or None)

    def json(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        return self._checked(response, path).json()

    def text(self, path: str, **params: Any) -> str:
        return self._checked(self.get(path, **params), path).text

    def content(self, path: str, **params: Any) -> bytes:
        return self._checked(self.get(path, **params), path).content

    def _checked(self, response: Any, path: str) -> Any:
        if response.status_code != 200:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RemoteError(f"{self.origin}{path}: {response.status_code} {message}")
        return response

    # ---------------------------------------------------------------- signing in

    def sign_in_code(self) -> str:
        """A one-time code for the web UI: the service's challenge, signed here for this origin."""
        answer = self._checked(self.request("GET", "/api/login/challenge", sign=False), "/api/login/challenge").json()
        challenge = answer.get("challenge")
        if not isinstance(challenge, str) or not challenge.isalnum() or len(challenge) > 128:
            raise RemoteError(f"{self.origin}: the challenge it gave is malformed")
        signature = self.key.sign(login_message(self.origin, challenge))
        return f"{challenge}.{self.key.public.key_id}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"

    # ---------------------------------------------------------------- checks made here

    def verified_checkpoint(self, run: str, trainer: PublicKey) -> Checkpoint:
        """The run's latest checkpoint, its note signature checked under ``trainer`` (the auditor's own copy)."""
        note = self.text(f"/api/runs/{run}/checkpoint")
        origin = note.split("\n", 1)[0]
        try:
            text, _ = open_note(note, [Verifier(origin, trainer.raw)])
            return Checkpoint.parse(text)
        except NoteError as error:
            raise RemoteError(f"run {run}: its checkpoint is not signed by trainer key {trainer.key_id} ({error})") \
                from None

    def verify_inclusion(self, run: str, step: int, trainer: PublicKey) -> dict[str, Any]:
        """The entry of ``step``, proven into the trainer-signed checkpoint; returns its decoded body."""
        checkpoint = self.verified_checkpoint(run, trainer)
        proof = self.json(f"/api/runs/{run}/proof/inclusion", step=step, tree_size=checkpoint.size)
        entry = base64.b64decode(proof["entry_base64"])
        index = proof["leaf_index"]
        if not (type(index) is int and 0 <= index < checkpoint.size and proof["tree_size"] == checkpoint.size):
            raise RemoteError(f"run {run}: the proof is for entry {index} of {proof['tree_size']}, not within "
                              f"the signed tree of {checkpoint.size}")
        if not merkle.verify_inclusion(index, checkpoint.size, merkle.leaf_hash(entry),
                                       [bytes.fromhex(p) for p in proof["audit_path"]], checkpoint.root):
            raise RemoteError(f"run {run}: the inclusion proof for step {step} does not lead to the signed root")
        body = decode_entry(entry).body
        if struct.unpack(">Q", entry[4:12])[0] != index or body.get("step") != step:
            raise RemoteError(f"run {run}: asked for step {step}, the service proved entry {index} "
                              f"(step {body.get('step')})")
        return body

    def verify_entries(self, run: str, trainer: PublicKey) -> Checkpoint:
        """Every entry under the signed checkpoint, fetched as tlog-tiles entry bundles, hashed here: their root
        must be the signed root, and each must chain to the one before."""
        checkpoint = self.verified_checkpoint(run, trainer)
        leaves, previous = [], bytes(32)
        for bundle in range((checkpoint.size + 255) // 256):
            width = min(256, checkpoint.size - bundle * 256)
            data = self.content(f"/api/runs/{run}/tile/entries/{_tile_index(bundle)}"
                                + ("" if width == 256 else f".p/{width}"))
            at = 0
            for _ in range(width):
                if at + 2 > len(data):
                    raise RemoteError(f"run {run}: entry bundle {bundle} is cut short")
                (length,) = struct.unpack(">H", data[at:at + 2])
                entry = data[at + 2:at + 2 + length]
                at += 2 + length
                if entry[12:HEADER_SIZE] != previous:
                    raise RemoteError(f"run {run}: entry {len(leaves)} does not chain to the one before")
                previous = merkle.leaf_hash(entry)
                leaves.append(previous)
        if merkle.root(leaves) != checkpoint.root:
            raise RemoteError(f"run {run}: the {len(leaves)} entries served do not hash to the signed root")
        return checkpoint


def _tile_index(n: int) -> str:
    from smalti.governance.ledger.tiles import tile_index

    return tile_index(n)
