"""The read-only HTTP service over a folder of runs: a FastAPI app (its OpenAPI schema is the API's reference).

Every request passes ``Guard`` first, an ASGI middleware that, in this order: refuses oversized headers (431),
a ``Host`` that is not this service's origin (421), methods other than GET and HEAD (POST only to sign in and
out: 405), and clients over their refusal budget (429); authenticates (a session cookie or an RFC 9421
signature; public: the UI's code, the OpenAPI schema and the sign-in challenge); runs the route, turning any
exception into a JSON 500; adds the security headers (a strict Content-Security-Policy, nosniff, no framing,
``Cache-Control: no-store`` on the API); and records the request in the access log.

Nothing writes into a run: ledgers are opened read-only (immutable when no trainer writes them), files are only
read, and every path is looked up by name among the runs (``smalti.serve.runs``).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from smalti.errors import SmaltiError
from smalti.serve import api
from smalti.serve.auth import AuthError, Sessions
from smalti.serve.runs import BadRequest, NotFound, Unprocessable
from smalti.serve.service import Busy, Service, ServeSettings

MAX_HEADERS = 16384  # bytes of all request headers together
MAX_BODY = 4096  # bytes of a sign-in request's body
PUBLIC = ("/", "/ui", "/openapi.json", "/api/login/challenge", "/api/login")  # served without a credential
POSTS = ("/api/login", "/api/logout")
# A full tile or entry bundle (no ".p/W" suffix): its bytes are fixed by the log's append-only history, so any
# cache may keep it for good; a partial tile grows and is never cached.
FULL_TILE = re.compile(r"/api/runs/[^/]+/tile/(?:[0-9]+|entries)(?:/x[0-9]{3})*/[0-9]{3}")
IMMUTABLE = b"max-age=31536000, immutable"
# A run's log as a tlog client reads it (RUN/checkpoint, RUN/tile/...): public with --public-tiles
LOG_READ = re.compile(r"/api/runs/[^/]+/(?:checkpoint|tile/.+)")
_BASE_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
UI_CSP = f"{_BASE_CSP}; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
# The report is one page of inline SVG and a stylesheet: no script at all, and sandboxed (an opaque origin), so
# even markup that slipped through could not read the session or the API.
REPORT_CSP = f"{_BASE_CSP}; style-src 'unsafe-inline'; img-src data:; sandbox"
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]


def _json(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


class Guard:
    """See the module docstring: every request, in one place, before and after its route."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        service, method, path = self.service, scope["method"], scope["path"]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        query = scope.get("query_string", b"").decode("latin-1")
        target = (scope.get("raw_path") or path.encode()).decode("latin-1") + (f"?{query}" if query else "")
        client = self.service.client_address((scope.get("client") or ("?", 0))[0], headers)
        reader, refusal = None, self._refusal(method, path, headers, client)
        if refusal is None and method == "POST":
            receive, refusal = await self._read_body(receive)
        public_log = service.settings.public_tiles and LOG_READ.fullmatch(path) is not None
        if refusal is None and not self._public(path) and not public_log:
            try:
                reader = self._authenticate(method, target, headers)
            except AuthError as error:
                refusal = (error.status, error.message)
        if refusal is not None:
            status, message = refusal
            if status in (400, 401, 408, 411, 413, 415, 421, 429, 431):
                service.throttle.failed(client)
            service.access_log.refused(client, status)
            await self._send_json(send, status, message, path)
            return
        scope.setdefault("state", {}).update(reader=reader, client=client)
        status = await self._call(scope, receive, send, method, path)
        if status >= 400 and path in ("/api/login", "/api/login/challenge"):
            service.throttle.failed(client)  # refused sign-ins count toward the address's budget too
        who = scope["state"].get("reader")  # a sign-in or a report ticket names its reader once the route ran
        if who is not None:
            event = {"/api/login": "sign-in", "/api/logout": "sign-out"}.get(
                path, "report" if path.startswith("/report/") else "request"
            )
            if path.startswith("/report/"):  # the ticket is a secret; the run it opened is the record
                shown, query = "/report/(ticket)", f"run={scope['state'].get('report_run', '')}"
            else:
                shown = path
            service.access_log.record(
                who.name, who.key_id, method, shown, query if path != "/api/login" else "", status, event
            )
        elif path == "/api/login" or path.startswith("/report/"):
            service.access_log.refused(client, status)

    def _refusal(self, method: str, path: str, headers: list[tuple[str, str]], client: str) -> tuple[int, str] | None:
        size = sum(len(k) + len(v) for k, v in headers)
        if size > MAX_HEADERS:
            return 431, f"request headers of {size} bytes: more than {MAX_HEADERS}"
        hosts = [v for k, v in headers if k == "host"]
        if len(hosts) != 1 or hosts[0].lower() not in self.service.hosts:
            return 421, (
                f"this service answers as {self.service.origin}; the request was addressed to "
                f"{hosts[0] if hosts else 'no host'}"
            )
        if method not in ("GET", "HEAD") and not (method == "POST" and path in POSTS):
            return 405, f"{method}: this service only reads (GET, HEAD; POST only to sign in and out)"
        if method == "HEAD" and path.startswith("/report/"):
            return 405, "HEAD: a report link is good once; open it with GET"
        if method == "POST":
            if any(k == "transfer-encoding" for k, _ in headers):
                return 411, "send the body with a Content-Length (no chunked encoding)"
            length = next((v for k, v in headers if k == "content-length"), "0")
            if not re.fullmatch(r"[0-9]{1,9}", length) or int(length) > MAX_BODY:
                return 413, f"a sign-in body is at most {MAX_BODY} bytes"
            if not any(k == "content-type" and v.split(";")[0].strip() == "application/json" for k, v in headers):
                return 415, "send JSON (Content-Type: application/json)"
        if self.service.throttle.blocked(client):
            return 429, "too many refused requests from this address; wait a minute"
        return None

    async def _read_body(self, receive: Any) -> tuple[Any, tuple[int, str] | None]:
        """A POST's whole body, at most MAX_BODY bytes within the body timeout (a body sent slowly holds nothing
        for long); then a ``receive`` that gives the route exactly that body."""
        loop, seconds = asyncio.get_running_loop(), self.service.settings.body_timeout
        deadline, body, more = loop.time() + seconds, b"", True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return receive, (408, f"the body did not arrive within {seconds:g} seconds")
            if message["type"] != "http.request":
                return receive, (400, "the client went away")
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return receive, (413, f"a sign-in body is at most {MAX_BODY} bytes")
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None

    @staticmethod
    def _public(path: str) -> bool:
        return path in PUBLIC or path.startswith("/ui/") or path.startswith("/report/")

    def _authenticate(self, method: str, target: str, headers: list[tuple[str, str]]):
        cookie = SimpleCookie()
        for k, v in headers:
            if k == "cookie":
                try:
                    cookie.load(v)
                except Exception:  # a malformed cookie header is no credential, not an error
                    pass
        token = cookie.get(self.service.cookie_name)
        binding = next((v for k, v in headers if k == Sessions.HEADER), None)
        session = self.service.sessions.reader(token.value if token else None, binding)
        if session is not None:
            return session
        if token is not None and not any(k == "signature" for k, _ in headers):
            raise AuthError(401, "session expired or ended: sign in again (smalti auditor sign-in)")
        return self.service.authenticator.authenticate(method, target, headers)

    async def _call(self, scope: dict[str, Any], receive: Any, send: Any, method: str, path: str) -> int:
        """Run the route; HEAD is answered as GET without a body. Returns the status sent."""
        sent: dict[str, Any] = {"status": 500, "started": False}
        head = method == "HEAD"
        csp = (
            UI_CSP.encode()
            if (path.startswith("/ui") or path == "/")
            else (
                REPORT_CSP.encode() if path.endswith("/report") or path.startswith("/report/") else _BASE_CSP.encode()
            )
        )

        async def guarded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["status"], sent["started"] = message["status"], True
                extra = [(b"content-security-policy", csp), *SECURITY_HEADERS]
                if message["status"] == 200 and FULL_TILE.fullmatch(path):
                    # public only where the operator made tiles public; else the auditor's own cache keeps it
                    public = self.service.settings.public_tiles
                    extra.append((b"cache-control", (b"public, " if public else b"private, ") + IMMUTABLE))
                elif path.startswith(("/api/", "/report/")) or path == "/openapi.json":
                    extra.append((b"cache-control", b"no-store"))
                message = dict(message, headers=[*message.get("headers", []), *extra])
            elif message["type"] == "http.response.body" and head:
                message = dict(message, body=b"")
            await send(message)

        try:
            await self.app(dict(scope, method="GET") if head else scope, receive, guarded_send)
        except Exception as error:  # never a traceback to the client, and the access log still sees it
            if not sent["started"]:
                await self._send_json(guarded_send, 500, f"internal error ({type(error).__name__})", path)
            sent["status"] = 500
        return sent["status"]

    async def _send_json(self, send: Any, status: int, message: str, path: str) -> None:
        body = _json(status, message)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"content-security-policy", _BASE_CSP.encode()),
                    (b"cache-control", b"no-store"),
                    *SECURITY_HEADERS,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def create_app(settings: ServeSettings) -> FastAPI:
    service = Service(settings)
    app = FastAPI(
        title="Smalti audit service",
        version="2",
        docs_url=None,
        redoc_url=None,
        description="Read-only, credentialed access to training runs' evidence (docs/auditing.md). Every "
        "request is signed with HTTP Message Signatures (RFC 9421) by an auditor key the signed "
        "taxonomy names, for this service's origin, or carries a session cookie bought with "
        "a sign-in code (smalti auditor sign-in).",
    )
    app.state.service = service
    app.router.add_event_handler("shutdown", service.close)
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "static", html=True), name="ui")
    app.include_router(api.sessions)
    app.include_router(api.runs)
    app.include_router(api.reports)
    app.add_api_route("/", lambda: RedirectResponse("/ui/"), include_in_schema=False)
    _add_error_handlers(app, service)
    app.add_middleware(Guard, service=service)
    return app


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    def answer(status: int):
        async def handler(_: Request, error: Exception) -> JSONResponse:
            message = service.scrub(str(error))  # no path of this machine leaves it
            return JSONResponse({"error": message, "status": status}, status_code=status)

        return handler

    for kind, status in ((NotFound, 404), (BadRequest, 400), (Unprocessable, 422), (Busy, 503), (SmaltiError, 400)):
        app.add_exception_handler(kind, answer(status))

    async def unreadable(_: Request, error: sqlite3.DatabaseError) -> JSONResponse:
        return JSONResponse(
            {"error": f"a ledger could not be read ({service.scrub(str(error))})", "status": 422}, status_code=422
        )

    # Starlette types every handler as taking any Exception; it calls each with its own class only
    app.add_exception_handler(sqlite3.DatabaseError, unreadable)  # type: ignore[arg-type]

    async def invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}", "status": 400}, status_code=400)

    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "not found" if error.status_code == 404 else str(error.detail)
        return JSONResponse({"error": message, "status": error.status_code}, status_code=error.status_code)

    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]  # as above
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # as above
