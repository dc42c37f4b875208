"""Who is asking: HTTP Message Signatures (RFC 9421) by a key the signed taxonomy names, or a browser session
bought with a one-time challenge signed outside the browser.

Why RFC 9421 and not mutual TLS: the auditor's credential is then the same Ed25519 key the taxonomy
already names in the auditor role; there is no certificate authority to run, no client certificate
to issue, and it survives TLS-terminating proxies. Each request signs its method and full target URI
(``@method``, ``@target-uri``) with ``created`` and a ``nonce``, under the tag ``smalti-audit``.

Every signature is bound to this service: ``@target-uri`` is rebuilt from the service's configured public
origin (``--origin``), never from the client's ``Host`` header, so a request signed for another service does
not verify here, and the login message names the origin too. Replays are refused by nonce while the service
runs, and signatures created before the service started are refused outright (the nonces of an earlier
process are not kept, so this is what stops a replay across a restart).

401: no signature, a malformed or failing one, an unknown key, an expired, replayed or pre-start one.
403: a valid signature by a key the taxonomy names in another role (e.g. the trainer's).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, cast

from smalti.trust.keys import PublicKey
from smalti.trust.taxonomy import Authority, Taxonomy

TAG = "smalti-audit"
MAX_AGE = datetime.timedelta(minutes=5)
MAX_HEADER = 8192  # bytes of Signature and Signature-Input together
LOGIN_CONTEXT = "smalti-login/v2"


class AuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Reader:
    """An authenticated reader: the taxonomy's authority behind the key."""

    name: str
    key_id: str


def login_message(origin: str, challenge: str) -> bytes:
    """What an auditor signs to sign in to the service at ``origin``: a context string no other Smalti signature
    starts with (tree heads sign C2SP checkpoints, cosignatures ``cosignature/v1``, requests RFC 9421 signature
    bases, certificates and files JSON or raw digests), the origin and the challenge."""
    return f"{LOGIN_CONTEXT}\n{origin}\n{challenge}\n".encode()


class RequestAuthenticator:
    def __init__(self, taxonomy: Taxonomy, origin: str) -> None:
        self.authorities: dict[str, Authority] = {}
        for a in taxonomy.authorities.values():  # a key shared by roles (allow_shared_keys) reads as its auditor
            if a.key and (a.key.key_id not in self.authorities or a.role == "auditor"):
                self.authorities[a.key.key_id] = a
        self.origin = origin.rstrip("/")
        self.started = int(time.time())
        self._nonces: dict[tuple[str, int | str], float] = {}
        self._lock = threading.Lock()
        self._resolver = self._make_resolver()

    def _make_resolver(self) -> Any:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from http_message_signatures import HTTPSignatureKeyResolver

        keys = {
            key_id: Ed25519PublicKey.from_public_bytes(cast(PublicKey, a.key).raw)  # only authorities with a key
            for key_id, a in self.authorities.items()
        }

        class Keys(HTTPSignatureKeyResolver):
            def resolve_public_key(self, key_id: str) -> Any:
                return keys.get(key_id)

        return Keys()

    def authenticate(self, method: str, target: str, headers: list[tuple[str, str]]) -> Reader:
        """``target``: the path and query exactly as sent; the URI signed is this service's origin + target."""
        from http_message_signatures import HTTPMessageVerifier, algorithms
        from http_message_signatures.exceptions import HTTPMessageSignaturesException

        present = {name.lower() for name, _ in headers}
        if "signature" not in present or "signature-input" not in present:
            raise AuthError(
                401,
                "no credential: sign the request (RFC 9421, an auditor key the taxonomy names); see docs/auditing.md",
            )
        size = sum(len(v) for n, v in headers if n.lower() in ("signature", "signature-input"))
        if size > MAX_HEADER:
            raise AuthError(401, f"signature headers of {size} bytes: more than {MAX_HEADER}")
        verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=self._resolver)
        message = SimpleNamespace(method=method.upper(), url=self.origin + target, headers=_Headers(headers))
        try:
            results = verifier.verify(
                message, max_age=MAX_AGE, expect_tag=TAG, require_components=("@method", "@target-uri")
            )
        except (HTTPMessageSignaturesException, ValueError, TypeError, KeyError) as error:
            reason = " ".join(str(error).split())[:200] or type(error).__name__
            raise AuthError(401, f"signature refused: {reason} (requests are signed for {self.origin})") from None
        params = results[0].parameters
        key_id, nonce, created = str(params.get("keyid", "")), params.get("nonce"), params.get("created")
        if not nonce:
            raise AuthError(401, "signature refused: it carries no nonce (replays could not be told apart)")
        if type(created) is int and created < self.started:
            raise AuthError(401, "signature refused: created before this service started (sign a fresh request)")
        now = time.time()
        with self._lock:
            if len(self._nonces) > 10_000:
                self._nonces = {k: until for k, until in self._nonces.items() if until > now}
            if (key_id, nonce) in self._nonces:
                raise AuthError(401, "signature refused: replayed (this nonce was used already)")
            self._nonces[(key_id, nonce)] = now + MAX_AGE.total_seconds() + 60
        return self.reader(key_id)

    def reader(self, key_id: str) -> Reader:
        authority = self.authorities.get(key_id)
        if authority is None:
            raise AuthError(401, f"key {key_id} is not named in the taxonomy")
        if authority.role != "auditor":
            raise AuthError(403, f"key {key_id} is the taxonomy's {authority.role} '{authority.name}', not an auditor")
        return Reader(authority.name, key_id)


class _Headers:
    """The header interface the library reads (name/value pairs in order)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)

    def __iter__(self) -> Any:
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


@dataclass
class _Session:
    reader: Reader
    expires: float
    binding: str  # the second half of the credential, held by the page (sessionStorage), never in a cookie


@dataclass
class _Ticket:
    reader: Reader
    run: str
    expires: float


class Sessions:
    """Browser sessions, bought with a sign-in code: the service's one-time challenge signed *outside* the
    browser (``smalti auditor sign-in``), so no private key ever enters a page this service serves.

    The code is ``CHALLENGE.KEY_ID.SIGNATURE`` (the signature base64url, over :func:`login_message`). A challenge
    is good once, for two minutes; a session lasts fifteen minutes.

    A session is two halves, both needed on every request: an HttpOnly, SameSite=Strict cookie (Secure over
    https), which script cannot read, and a token the page keeps in ``sessionStorage`` and sends as the
    ``X-Smalti-Session`` header. Cookies are not bound to a port, so a page of another service on the same host
    receives the cookie; it never has the header's half, which the browser keeps per origin. A page that could
    run script here would have the header's half but not the cookie, and could not carry the session away.

    The browser opens the HTML report, which cannot carry a header, through a **report ticket**: a random URL
    the signed-in page asks for, good once, for one minute, for one run.

    Every store is bounded: 100,000 outstanding challenges in all and 32 per client address; 256 sessions per
    reader (the oldest goes); 1,000 tickets.
    """

    COOKIE = "smalti_session"
    HEADER = "x-smalti-session"
    LIFETIME = 15 * 60
    CHALLENGE_LIFETIME = 120
    TICKET_LIFETIME = 60
    MAX_CHALLENGES = 100_000
    MAX_CHALLENGES_PER_CLIENT = 32
    MAX_SESSIONS_PER_READER = 256
    MAX_TICKETS = 10_000
    MAX_TICKETS_PER_READER = 16

    def __init__(self, authenticator: RequestAuthenticator) -> None:
        self.authenticator = authenticator
        self._challenges: dict[str, tuple[float, str]] = {}  # challenge -> (expiry, client), oldest first
        self._per_client: dict[str, int] = {}
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._tickets: OrderedDict[str, _Ticket] = OrderedDict()
        self._lock = threading.Lock()

    def _drop_expired_challenges(self, now: float) -> None:
        """From the oldest on (they expire in the order they were made): amortised O(1) a challenge."""
        while self._challenges:
            token, (expiry, client) = next(iter(self._challenges.items()))
            if expiry > now:
                break
            del self._challenges[token]
            self._uncount(client)

    def _uncount(self, client: str) -> None:
        left = self._per_client.get(client, 0) - 1
        if left > 0:
            self._per_client[client] = left
        else:
            self._per_client.pop(client, None)

    def challenge(self, client: str = "") -> str:
        now = time.time()
        with self._lock:
            self._drop_expired_challenges(now)
            if self._per_client.get(client, 0) >= self.MAX_CHALLENGES_PER_CLIENT:
                raise AuthError(
                    429,
                    f"{self.MAX_CHALLENGES_PER_CLIENT} sign-in challenges are outstanding for this "
                    f"address; use one, or wait {self.CHALLENGE_LIFETIME} seconds",
                )
            if len(self._challenges) >= self.MAX_CHALLENGES:
                raise AuthError(
                    503,
                    f"{self.MAX_CHALLENGES} sign-in challenges are outstanding; try again in "
                    f"{self.CHALLENGE_LIFETIME} seconds",
                )
            token = secrets.token_hex(16)
            self._challenges[token] = (now + self.CHALLENGE_LIFETIME, client)
            self._per_client[client] = self._per_client.get(client, 0) + 1
        return token

    def login(self, code: str) -> tuple[Reader, str, str]:
        """(reader, cookie token, header token)."""
        parts = code.strip().split(".") if isinstance(code, str) else []
        if len(parts) != 3:
            raise AuthError(
                400, "sign-in code: expected CHALLENGE.KEY_ID.SIGNATURE, as smalti auditor sign-in prints it"
            )
        challenge, key_id, signature = parts
        with self._lock:
            expiry, client = self._challenges.pop(challenge, (0.0, ""))  # one use only
            if expiry:
                self._uncount(client)
        if expiry <= time.time():
            raise AuthError(
                401, "sign-in refused: unknown, used or expired challenge (run smalti auditor sign-in again)"
            )
        authority = self.authenticator.authorities.get(key_id)
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        except (binascii.Error, ValueError):
            raise AuthError(401, "sign-in refused: the signature is not base64url") from None
        message = login_message(self.authenticator.origin, challenge)
        if authority is None or authority.key is None or not PublicKey(authority.key.raw).verify(raw, message):
            raise AuthError(
                401,
                f"sign-in refused: the signature does not verify under a key the taxonomy names, "
                f"for {self.authenticator.origin}",
            )
        reader = self.authenticator.reader(key_id)
        token, binding = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._sessions = OrderedDict((t, s) for t, s in self._sessions.items() if s.expires > now)
            mine = [t for t, s in self._sessions.items() if s.reader.key_id == key_id]
            for old in mine[: max(0, len(mine) - self.MAX_SESSIONS_PER_READER + 1)]:
                del self._sessions[old]
            self._sessions[token] = _Session(reader, now + self.LIFETIME, binding)
        return reader, token, binding

    def reader(self, token: str | None, binding: str | None) -> Reader | None:
        """The session's reader if the cookie's token and the header's binding are one live session's."""
        if not token:
            return None
        with self._lock:
            found = self._sessions.get(token)
            if found is None or found.expires < time.time():
                self._sessions.pop(token, None)
                return None
            if not binding or not secrets.compare_digest(found.binding, binding):
                return None
            return found.reader

    def logout(self, token: str | None, binding: str | None, everywhere: bool = False) -> int:
        """End this session, or (``everywhere``) every session of its reader; returns how many ended."""
        with self._lock:
            found = self._sessions.get(token or "")
            if found is None or not binding or not secrets.compare_digest(found.binding, binding):
                return 0
            assert token is not None  # sessions are keyed by issued tokens, never by ""
            ended = (
                [t for t, s in self._sessions.items() if s.reader.key_id == found.reader.key_id]
                if everywhere
                else [token]
            )
            for t in ended:
                del self._sessions[t]
            return len(ended)

    def ticket(self, reader: Reader, run: str) -> str:
        """A report link for ``run``; a reader holds at most 16 (its oldest goes), so no reader can push out
        another's."""
        now = time.time()
        with self._lock:
            self._tickets = OrderedDict((t, x) for t, x in self._tickets.items() if x.expires > now)
            mine = [t for t, x in self._tickets.items() if x.reader.key_id == reader.key_id]
            for old in mine[: max(0, len(mine) - self.MAX_TICKETS_PER_READER + 1)]:
                del self._tickets[old]
            if len(self._tickets) >= self.MAX_TICKETS:
                raise AuthError(503, "too many report links are outstanding; try again in a minute")
            token = secrets.token_urlsafe(32)
            self._tickets[token] = _Ticket(reader, run, now + self.TICKET_LIFETIME)
        return token

    def redeem(self, token: str) -> _Ticket | None:
        with self._lock:
            found = self._tickets.pop(token, None)
        return found if found is not None and found.expires > time.time() else None

    def count(self) -> int:
        return len(self._sessions)


class RefusalThrottle:
    """Failed authentications per client address over a sliding minute; past ``limit`` the client gets 429
    without the service spending a signature check on it.

    The window slides (this minute's count plus the last minute's, weighted by how much of it still overlaps)
    so that a burst that straddles a minute boundary is not forgiven at the boundary."""

    def __init__(
        self, limit: int = 600, window: float = 60.0, clients: int = 65536, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit, self.window, self.clients, self._clock = limit, window, clients, clock
        self._current: dict[str, int] = {}
        self._previous: dict[str, int] = {}
        self._since = clock()
        self._lock = threading.Lock()

    def _roll(self) -> float:
        """Moves the window on; answers how much of the previous minute still counts (0..1)."""
        elapsed = self._clock() - self._since
        if elapsed >= self.window:
            whole = int(elapsed // self.window)
            self._previous = self._current if whole == 1 else {}
            self._current = {}
            self._since += whole * self.window
            elapsed -= whole * self.window
        return 1.0 - elapsed / self.window

    def _key(self, client: str) -> str:
        known = client in self._current or client in self._previous
        return client if known or len(self._current) < self.clients else "(others)"

    def blocked(self, client: str) -> bool:
        """Over the limit: the client's own count, or, once the table is full of other addresses, the count all
        addresses not in it share (so that coming from a fresh address does not switch the throttle off)."""
        with self._lock:
            overlap = self._roll()
            key = self._key(client)
            return self._current.get(key, 0) + overlap * self._previous.get(key, 0) >= self.limit

    def failed(self, client: str) -> None:
        with self._lock:
            self._roll()
            key = self._key(client)
            self._current[key] = self._current.get(key, 0) + 1
