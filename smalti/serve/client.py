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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.trust import merkle
from smalti.trust.entry import HEADER_SIZE, decode_entry
from smalti.trust.note import Checkpoint, NoteError, Verifier, open_note
from smalti.serve.auth import TAG, login_message


MAX_ANSWER = 64 << 20  # bytes of one answer (an entry bundle is at most 16 MiB)


class RemoteError(SmaltiError):
    """The service refused, or answered something that does not check out."""


def printable(text: object, limit: int = 300) -> str:
    """What a service says, safe for a terminal: control characters (escape sequences that could erase a line and
    print a fake success) shown as escapes, and at most ``limit`` characters."""
    import unicodedata

    def safe(c: str) -> str:
        if c == " " or unicodedata.category(c)[0] not in "CZ":  # controls, format marks, odd separators
            return c
        return f"\\x{ord(c):02x}" if ord(c) < 256 else f"\\u{ord(c):04x}"

    return "".join(safe(c) for c in str(text)[:limit])


class _TokenBackedKey(Ed25519PrivateKey):
    """A Smalti signing key (a file's or a token's) in the shape the signature library takes: only ``sign``."""

    def __init__(self, key: SigningKey) -> None:
        self._key = key

    def sign(self, data: bytes) -> bytes:  # type: ignore[override]  # the signature library passes bytes only
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

    def request(
        self, method: str, path: str, params: dict[str, Any] | None = None, sign: bool = True, **kwargs: Any
    ) -> Any:
        prepared = self._requests.Request(method, self.origin + path, params=params, **kwargs).prepare()
        if sign:
            self._signer.sign(
                prepared,
                key_id=self.key.public.key_id,
                covered_component_ids=("@method", "@target-uri"),
                tag=TAG,
                nonce=uuid.uuid4().hex,
                created=datetime.datetime.now(datetime.timezone.utc),
            )
        try:
            response = self.session.send(prepared, timeout=self.timeout, allow_redirects=False, stream=True)
            if 300 <= response.status_code < 400:  # never follow: the signature was made for this URL only
                raise RemoteError(
                    f"{self.origin}{path}: redirected ({response.status_code}) to "
                    f"{printable(response.headers.get('location', '?'))}; not followed"
                )
            body = bytearray()
            for chunk in response.iter_content(1 << 16):
                body += chunk
                if len(body) > MAX_ANSWER:
                    response.close()
                    raise RemoteError(f"{self.origin}{path}: an answer larger than {MAX_ANSWER >> 20} MiB; not read")
            response._content, response._content_consumed = bytes(body), True
            return response
        except self._requests.RequestException as error:
            raise RemoteError(f"{self.origin}: {type(error).__name__}: {printable(str(error))}") from None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params or None)

    def json(self, path: str, **params: Any) -> Any:
        response = self.get(path, **params)
        return self._checked(response, path).json()

    def text(self, path: str, **params: Any) -> str:
        """UTF-8, whatever charset the answer claims (C2SP notes are UTF-8; their signature lines start with an
        em dash)."""
        try:
            return self._checked(self.get(path, **params), path).content.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteError(f"{self.origin}{path}: the answer is not UTF-8 text") from None

    def content(self, path: str, **params: Any) -> bytes:
        return self._checked(self.get(path, **params), path).content

    def _checked(self, response: Any, path: str) -> Any:
        if response.status_code != 200:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise RemoteError(f"{self.origin}{path}: {response.status_code} {printable(message)}")
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

    def verified_checkpoint(self, run: str, trainer: PublicKey, expect_origin: str | None = None) -> Checkpoint:
        """The run's latest checkpoint, its note signature checked under ``trainer`` (the auditor's own copy), and
        its log's name ``expect_origin`` where the auditor knows it (a log of another run signed by the same
        trainer would otherwise pass)."""
        note = self.text(f"/api/runs/{run}/checkpoint")
        origin = note.split("\n", 1)[0]
        if expect_origin is not None and origin != expect_origin:
            raise RemoteError(f"run {run}: the service shows the log {printable(origin)}, not {expect_origin}")
        try:
            text, _ = open_note(note, [Verifier(origin, trainer.raw)])
            return Checkpoint.parse(text)
        except NoteError as error:
            raise RemoteError(
                f"run {run}: its checkpoint is not signed by trainer key {trainer.key_id} ({printable(str(error))})"
            ) from None

    def check_history(self, run: str, checkpoint: Checkpoint, state: Path) -> str:
        """Hold ``checkpoint`` against the last one verified for this run from this service (kept in ``state``, a
        folder of the auditor's): the same log, and a tree that extends the old one by a consistency proof
        checked here. Returns what held; keeps the new checkpoint."""
        import hashlib
        import json as _json

        state.mkdir(parents=True, exist_ok=True)
        record = state / (hashlib.sha256(f"{self.origin}\n{run}".encode()).hexdigest()[:32] + ".json")
        before = _json.loads(record.read_text()) if record.is_file() else None
        said = "first checkpoint verified for this run from this service"
        if before is not None:
            size, root = int(before["size"]), bytes.fromhex(before["root"])
            if before["origin"] != checkpoint.origin:
                raise RemoteError(
                    f"run {run}: its log was {before['origin']} when last verified; the service now "
                    f"shows {printable(checkpoint.origin)}"
                )
            if size > checkpoint.size:
                raise RemoteError(
                    f"run {run}: a tree of {size} entries was verified before; the service now shows "
                    f"{checkpoint.size}: history was cut"
                )
            if size == checkpoint.size and root != checkpoint.root:
                raise RemoteError(
                    f"run {run}: another tree of {size} entries than the one verified before: a split view"
                )
            if size < checkpoint.size:
                proof = self.json(f"/api/runs/{run}/proof/consistency", first=size, second=checkpoint.size)
                if not merkle.verify_consistency(
                    size, checkpoint.size, [bytes.fromhex(p) for p in proof["proof"]], root, checkpoint.root
                ):
                    raise RemoteError(
                        f"run {run}: the tree of {checkpoint.size} entries does not extend the tree of "
                        f"{size} verified before"
                    )
            said = f"consistent with the tree of {size} entries verified before"
        from smalti.io import atomic_write_text

        atomic_write_text(
            record,
            _json.dumps({"origin": checkpoint.origin, "size": checkpoint.size, "root": checkpoint.root.hex()}) + "\n",
        )
        return said

    def verify_inclusion(
        self, run: str, step: int, trainer: PublicKey, checkpoint: Checkpoint | None = None
    ) -> dict[str, Any]:
        """The entry of ``step``, proven into the trainer-signed checkpoint; returns its decoded body."""
        checkpoint = checkpoint or self.verified_checkpoint(run, trainer)
        proof = self.json(f"/api/runs/{run}/proof/inclusion", step=step, tree_size=checkpoint.size)
        if not isinstance(proof, dict):
            raise RemoteError(f"run {run}: the inclusion proof is not a JSON object")
        index = proof.get("leaf_index")
        if not (type(index) is int and 0 <= index < checkpoint.size and proof["tree_size"] == checkpoint.size):
            raise RemoteError(
                f"run {run}: the proof is for entry {printable(index)} of "
                f"{printable(proof.get('tree_size'))}, not within the signed tree of {checkpoint.size}"
            )
        try:
            entry = base64.b64decode(str(proof.get("entry_base64")), validate=True)
            path = [bytes.fromhex(p) for p in proof.get("audit_path") or []]
        except (ValueError, TypeError):
            raise RemoteError(f"run {run}: the inclusion proof is malformed") from None
        if not merkle.verify_inclusion(index, checkpoint.size, merkle.leaf_hash(entry), path, checkpoint.root):
            raise RemoteError(f"run {run}: the inclusion proof for step {step} does not lead to the signed root")
        body = decode_entry(entry).body
        if struct.unpack(">Q", entry[4:12])[0] != index or body.get("step") != step:
            raise RemoteError(
                f"run {run}: asked for step {step}, the service proved entry {index} "
                f"(step {printable(body.get('step'))})"
            )
        return body

    def verify_entries(self, run: str, trainer: PublicKey, checkpoint: Checkpoint | None = None) -> Checkpoint:
        """Every entry under the signed checkpoint, fetched as tlog-tiles entry bundles, hashed here: their root
        must be the signed root, and each must chain to the one before."""
        checkpoint = checkpoint or self.verified_checkpoint(run, trainer)
        leaves: list[bytes] = []
        previous = bytes(32)
        for bundle in range((checkpoint.size + 255) // 256):
            width = min(256, checkpoint.size - bundle * 256)
            data = self.content(
                f"/api/runs/{run}/tile/entries/{_tile_index(bundle)}" + ("" if width == 256 else f".p/{width}")
            )
            at = 0
            for _ in range(width):
                if at + 2 > len(data):
                    raise RemoteError(f"run {run}: entry bundle {bundle} is cut short")
                (length,) = struct.unpack(">H", data[at : at + 2])
                entry = data[at + 2 : at + 2 + length]
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
