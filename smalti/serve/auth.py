"""Who is asking: HTTP Message Signatures (RFC 9421) by a key the signed taxonomy names.

Why RFC 9421 and not mutual TLS: the auditor's credential is then the same Ed25519 key the taxonomy
already names in the auditor role; there is no certificate authority to run, no client certificate
to issue, and it survives TLS-terminating proxies. Each request signs its method and full target URI
(``@method``, ``@target-uri``) with ``created`` and a ``nonce``, under the tag ``smalti-audit``; the
service keeps every nonce until its signature would have expired, so a replayed request is refused.
The verification itself is the ``http-message-signatures`` library's.

401: no signature, a malformed or failing one, an unknown key, an expired or replayed one.
403: a valid signature by a key the taxonomy names in another role (e.g. the trainer's).
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from smalti.governance.taxonomy import Authority, Taxonomy

TAG = "smalti-audit"
MAX_AGE = datetime.timedelta(minutes=5)
MAX_HEADER = 8192  # bytes of Signature and Signature-Input together


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Reader:
    """An authenticated reader: the taxonomy's authority behind the key."""

    name: str
    key_id: str


class RequestAuthenticator:
    def __init__(self, taxonomy: Taxonomy) -> None:
        self.authorities: dict[str, Authority] = {a.key.key_id: a for a in taxonomy.authorities.values() if a.key}
        self._nonces: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def _resolver(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from http_message_signatures import HTTPSignatureKeyResolver

        authorities = self.authorities

        class Keys(HTTPSignatureKeyResolver):
            def resolve_public_key(self, key_id: str):
                authority = authorities.get(key_id)
                return Ed25519PublicKey.from_public_bytes(authority.key.raw) if authority else None

        return Keys()

    def authenticate(self, method: str, url: str, headers: list[tuple[str, str]]) -> Reader:
        from http_message_signatures import HTTPMessageVerifier, algorithms
        from http_message_signatures.exceptions import HTTPMessageSignaturesException

        present = {name.lower() for name, _ in headers}
        if "signature" not in present or "signature-input" not in present:
            raise AuthError(401, "no credential: sign the request (RFC 9421, an auditor key the taxonomy names); "
                                 "see docs/auditing.md")
        size = sum(len(v) for n, v in headers if n.lower() in ("signature", "signature-input"))
        if size > MAX_HEADER:
            raise AuthError(401, f"signature headers of {size} bytes: more than {MAX_HEADER}")
        verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=self._resolver())
        message = SimpleNamespace(method=method.upper(), url=url, headers=_Headers(headers))
        try:
            results = verifier.verify(message, max_age=MAX_AGE, expect_tag=TAG,
                                      require_components=("@method", "@target-uri"))
        except (HTTPMessageSignaturesException, ValueError, TypeError, KeyError) as error:
            raise AuthError(401, f"signature refused: {' '.join(str(error).split())[:200]}") from None
        params = results[0].parameters
        key_id, nonce = str(params.get("keyid", "")), params.get("nonce")
        if not nonce:
            raise AuthError(401, "signature refused: it carries no nonce (replays could not be told apart)")
        now = time.time()
        with self._lock:
            self._nonces = {k: until for k, until in self._nonces.items() if until > now}
            if (key_id, nonce) in self._nonces:
                raise AuthError(401, "signature refused: replayed (this nonce was used already)")
            self._nonces[(key_id, nonce)] = now + MAX_AGE.total_seconds() + 60
        authority = self.authorities[key_id]
        if authority.role != "auditor":
            raise AuthError(403, f"key {key_id} is the taxonomy's {authority.role} '{authority.name}', not an auditor")
        return Reader(authority.name, key_id)


class _Headers:
    """The header interface the library reads (name/value pairs in order)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def items(self):
        return list(self._pairs)

    def __iter__(self):
        return iter(name for name, _ in self._pairs)

    def __contains__(self, name: Any) -> bool:
        return any(n.lower() == str(name).lower() for n, _ in self._pairs)

    def __getitem__(self, name: str) -> str:
        values = [v for n, v in self._pairs if n.lower() == name.lower()]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default


class Sessions:
    """Browser logins: a one-time challenge signed by an auditor's key buys a short-lived session cookie.

    The page signs ``smalti-login/v1\n<challenge>`` with the key the auditor loads into it (WebCrypto
    Ed25519); the key never leaves the page. No passwords. The cookie is HttpOnly and SameSite=Strict."""

    COOKIE = "smalti_session"
    LIFETIME = 15 * 60
    CHALLENGE_LIFETIME = 120

    def __init__(self, authenticator: RequestAuthenticator) -> None:
        self.authenticator = authenticator
        self._challenges: dict[str, float] = {}
        self._sessions: dict[str, tuple[Reader, float]] = {}
        self._lock = threading.Lock()

    def challenge(self) -> str:
        import secrets

        token = secrets.token_hex(16)
        now = time.time()
        with self._lock:
            self._challenges = {k: v for k, v in self._challenges.items() if v > now}
            self._challenges[token] = now + self.CHALLENGE_LIFETIME
        return token

    def login(self, challenge: str, key_id: str, signature: str) -> tuple[Reader, str]:
        import base64
        import binascii
        import secrets

        from smalti.governance.keys import PublicKey

        with self._lock:
            valid = self._challenges.pop(challenge, 0) > time.time()  # one use only
        if not valid:
            raise AuthError(401, "login refused: unknown, used or expired challenge (ask /api/login/challenge)")
        authority = self.authenticator.authorities.get(key_id)
        try:
            raw = base64.b64decode(signature, validate=True)
        except (binascii.Error, ValueError):
            raise AuthError(401, "login refused: the signature is not base64") from None
        if authority is None or not PublicKey(authority.key.raw).verify(raw, f"smalti-login/v1\n{challenge}".encode()):
            raise AuthError(401, "login refused: the signature does not verify under a key the taxonomy names")
        if authority.role != "auditor":
            raise AuthError(403, f"key {key_id} is the taxonomy's {authority.role} '{authority.name}', not an auditor")
        token = secrets.token_urlsafe(32)
        reader = Reader(authority.name, key_id)
        with self._lock:
            self._sessions[token] = (reader, time.time() + self.LIFETIME)
        return reader, token

    def reader(self, token: str | None) -> Reader | None:
        if not token:
            return None
        with self._lock:
            found = self._sessions.get(token)
            if found is None or found[1] < time.time():
                self._sessions.pop(token, None)
                return None
            return found[0]
