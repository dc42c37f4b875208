"""The read-only HTTP service over a folder of runs: a FastAPI app (its OpenAPI schema is the API's reference).

Every route reads; nothing writes into a run (ledgers are opened in SQLite's read-only mode, files are
only read). A run is named by its folder's name among ``RUNS_DIR``'s children, looked up in the listing
and never joined onto a path, so no request reaches a file outside the runs. Each request is
authenticated (``smalti.serve.auth``) and recorded in the access log, whatever its answer.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from smalti.errors import SmaltiError
from smalti.governance.ledger import merkle
from smalti.governance.taxonomy import Taxonomy
from smalti.serve.access_log import AccessLog
from smalti.serve.auth import AuthError, RequestAuthenticator, Sessions

READ_METHODS = ("GET", "HEAD")
MAX_HEADERS = 16384  # bytes of all request headers together
PUBLIC = ("/", "/ui", "/openapi.json", "/api/login/challenge", "/api/login")  # served without a credential


class NotFound(SmaltiError):
    exit_code = 1


class BadRequest(SmaltiError):
    exit_code = 1


def _target_uri(request: Request) -> str:
    """The URI exactly as the client sent it (the raw path, not Starlette's decoded and re-encoded one): what
    an RFC 9421 signature over ``@target-uri`` covers."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    host = request.headers.get("host") or request.url.netloc
    return f"{request.url.scheme}://{host}{raw.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


class Runs:
    """The runs under one folder, read only."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self._cache: dict[tuple[str, int], Any] = {}

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / "recipe.yaml").is_file())

    def path(self, name: str) -> Path:
        if name not in self.names():  # looked up, never joined: "..", "%2e%2e", "/" all land here
            raise NotFound(f"no run named {name!r} here")
        return self.root / name

    def store(self, name: str):
        from smalti.governance.ledger.store import LedgerStore, ledger_path

        path = self.path(name)
        if not ledger_path(path).is_file():
            raise NotFound(f"run {name!r} has no ledger")
        return LedgerStore(ledger_path(path), read_only=True)

    def head(self, name: str):
        store = self.store(name)
        try:
            heads, origin, key = store.heads(), store.origin, store.get_meta("trainer_public_key")
        finally:
            store.close()
        if not heads:
            raise NotFound(f"run {name!r} has no signed tree head yet")
        return heads[-1], origin, key

    def ledger(self, name: str):
        """The decoded entries up to the latest signed head (cached per head: a run in progress grows)."""
        from smalti.governance.ledger.audit import Ledger
        from smalti.governance.ledger.entry import decode_entry

        head, _, _ = self.head(name)
        key = (name, head.size)
        if key not in self._cache:
            store = self.store(name)
            try:
                bodies = [decode_entry(data).body for _, _, _, data in store.rows(0, head.size)]
            finally:
                store.close()
            self._cache = {k: v for k, v in self._cache.items() if k[0] != name}
            self._cache[key] = Ledger(run=bodies[0], steps=bodies[1:])
        return self._cache[key]


def create_app(runs_dir: Path, taxonomy: Taxonomy, access_log: Path) -> FastAPI:
    app = FastAPI(title="Smalti audit service", version="1", docs_url=None, redoc_url=None,
                  description="Read-only, credentialed access to training runs' evidence (docs/auditing.md). Every "
                              "request is signed with HTTP Message Signatures (RFC 9421) by an auditor key the signed "
                              "taxonomy names.")
    runs, auth, log = Runs(runs_dir), RequestAuthenticator(taxonomy), AccessLog(access_log)
    sessions = Sessions(auth)
    app.mount("/ui", StaticFiles(directory=Path(__file__).parent / "static", html=True), name="ui")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui/")

    @app.get("/api/login/challenge", summary="a one-time challenge for a browser login (no credential needed)")
    def login_challenge() -> dict[str, Any]:
        return {"challenge": sessions.challenge(), "expires_in": Sessions.CHALLENGE_LIFETIME,
                "sign": "Ed25519 over 'smalti-login/v1\\n' + challenge, by an auditor key"}

    @app.get("/api/login", summary="exchange a signed challenge for a session cookie (HttpOnly, SameSite=Strict)")
    def login(challenge: str, key_id: str, signature: str) -> JSONResponse:
        try:
            reader, token = sessions.login(challenge, key_id, signature)
        except AuthError as error:
            return _error(error.status, error.message)
        response = JSONResponse({"reader": reader.name, "key_id": reader.key_id, "expires_in": Sessions.LIFETIME})
        response.set_cookie(Sessions.COOKIE, token, max_age=Sessions.LIFETIME, httponly=True, samesite="strict",
                            path="/")
        return response

    @app.middleware("http")
    async def guard(request: Request, call_next):
        reader = None
        header_bytes = sum(len(k) + len(v) for k, v in request.headers.items())
        if header_bytes > MAX_HEADERS:
            response = _error(431, f"request headers of {header_bytes} bytes: more than {MAX_HEADERS}")
        elif request.method not in READ_METHODS:
            response = _error(405, f"{request.method}: this service only reads (GET)")
        elif request.url.path in PUBLIC or request.url.path.startswith("/ui/"):  # no run data: code, schema, login
            response = await call_next(request)
        else:
            try:
                reader = sessions.reader(request.cookies.get(Sessions.COOKIE)) or auth.authenticate(
                    request.method, _target_uri(request), list(request.headers.items()))
                request.state.reader = reader
                response = await call_next(request)
            except AuthError as error:
                response = _error(error.status, error.message)
        log.record(reader.name if reader else None, reader.key_id if reader else None, request.method,
                   request.url.path, response.status_code)
        return response

    @app.exception_handler(NotFound)
    async def not_found(_: Request, error: NotFound):
        return _error(404, str(error))

    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, error: BadRequest):
        return _error(400, str(error))

    @app.exception_handler(SmaltiError)
    async def smalti_error(_: Request, error: SmaltiError):
        return _error(400, str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(400, f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException):
        return _error(error.status_code, "not found" if error.status_code == 404 else str(error.detail))

    @app.exception_handler(Exception)
    async def anything(_: Request, error: Exception):  # never a traceback to the client
        return _error(500, f"internal error ({type(error).__name__})")

    @app.get("/api/runs", summary="every run, with its ledger's latest signed head")
    def list_runs() -> list[dict[str, Any]]:
        found = []
        for name in runs.names():
            try:
                head, origin, _ = runs.head(name)
                found.append({"run": name, "entries": head.size, "final": head.final, "signed": head.timestamp,
                              "origin": origin})
            except (NotFound, SmaltiError):
                found.append({"run": name, "entries": 0, "final": False, "signed": None, "origin": None})
        return found

    @app.get("/api/runs/{run}", summary="a run: classes, layers, latest head, lineage, certificate")
    def run_info(run: str) -> dict[str, Any]:
        from smalti.governance.certificate import CERTIFICATE
        from smalti.governance.lineage import chain

        path = runs.path(run)
        ledger = runs.ledger(run)
        head, origin, key = runs.head(run)
        lineage = [{"run": str(parent), "kind": link.kind, "head": link.head, "forgotten": link.forgotten}
                   for parent, link in chain(path)]
        return {"run": run, "classes": ledger.run["classes"], "layers": ledger.layer_names, "origin": origin,
                "trainer_key": key, "head": head.to_json(), "steps": len(ledger.steps), "lineage": lineage,
                "deletion_certificate": (path / CERTIFICATE).is_file()}

    @app.get("/api/runs/{run}/checkpoint", response_class=PlainTextResponse,
             summary="the latest signed tree head as a C2SP checkpoint (signed note)")
    def checkpoint(run: str) -> PlainTextResponse:
        from smalti.governance.keys import PublicKey

        head, _, key = runs.head(run)
        return PlainTextResponse(head.note(PublicKey.parse(key or "").raw))

    @app.get("/api/runs/{run}/tile/{tile:path}", summary="a C2SP tlog-tiles tile or entry bundle at the latest head")
    def tile(run: str, tile: str) -> Response:
        from smalti.governance.ledger.tiles import tiles

        head, _, _ = runs.head(run)
        store = runs.store(run)
        try:
            leaves = store.leaves(stop=head.size)
            for path, data, _ in tiles(leaves, lambda a, b: [r[3] for r in store.rows(a, b)]):
                if path == f"tile/{tile}":
                    return Response(data, media_type="application/octet-stream")
        finally:
            store.close()
        raise NotFound(f"no tile {tile!r} at tree size {head.size}")

    @app.get("/api/runs/{run}/entries/{index}", summary="one ledger entry, decoded and as its exact bytes")
    def entry(run: str, index: int) -> dict[str, Any]:
        from smalti.governance.ledger.entry import decode_entry

        head, _, _ = runs.head(run)
        if not 0 <= index < head.size:
            raise BadRequest(f"entry {index}: out of range (the signed tree holds 0..{head.size - 1})")
        store = runs.store(run)
        try:
            _, step, leaf, data = next(store.rows(index, index + 1))
        finally:
            store.close()
        return {"index": index, "step": step, "leaf_hash": leaf.hex(), "entry_base64": base64.b64encode(data).decode(),
                "body": decode_entry(data).body}

    @app.get("/api/runs/{run}/proof/inclusion", summary="RFC 6962 inclusion proof of a step's entry in the latest head")
    def inclusion(run: str, step: int = Query(..., description="the optimizer step")) -> dict[str, Any]:
        head, _, _ = runs.head(run)
        store = runs.store(run)
        try:
            found = store.entry_at_step(step)
            if found is None or found[0] >= head.size:
                raise BadRequest(f"step {step}: no entry under the latest signed head (size {head.size})")
            index, leaf, data = found
            proof = merkle.inclusion_proof(index, store.leaves(stop=head.size))
        finally:
            store.close()
        return {"step": step, "leaf_index": index, "tree_size": head.size, "entry_base64": base64.b64encode(data).decode(),
                "leaf_hash": leaf.hex(), "audit_path": [p.hex() for p in proof], "tree_head": head.to_json()}

    @app.get("/api/runs/{run}/proof/consistency", summary="RFC 6962 consistency proof between two tree sizes")
    def consistency(run: str, first: int, second: int | None = None) -> dict[str, Any]:
        head, _, _ = runs.head(run)
        second = head.size if second is None else second
        if not 0 < first <= second <= head.size:
            raise BadRequest(f"first={first}, second={second}: need 0 < first <= second <= {head.size}")
        store = runs.store(run)
        try:
            leaves = store.leaves(stop=second)
        finally:
            store.close()
        return {"first": first, "second": second, "first_root": merkle.root(leaves[:first]).hex(),
                "second_root": merkle.root(leaves).hex(),
                "proof": [p.hex() for p in merkle.consistency_proof(first, leaves)]}

    @app.get("/api/runs/{run}/audit/layer", summary="which classes reached a layer, how much, how often")
    def audit_layer(run: str, name: str) -> dict[str, Any]:
        return runs.ledger(run).layer(name)

    @app.get("/api/runs/{run}/audit/class", summary="which layers a class (or taxonomy node) reached, in which steps")
    def audit_class(run: str, name: str) -> dict[str, Any]:
        return runs.ledger(run).for_class(name)

    @app.get("/api/runs/{run}/audit/example", summary="which steps and layers an example (its ledger index) reached")
    def audit_example(run: str, index: int) -> dict[str, Any]:
        return runs.ledger(run).example(index)

    @app.get("/api/runs/{run}/audit/param", summary="as audit/layer, for the layer holding a parameter")
    def audit_param(run: str, name: str) -> dict[str, Any]:
        return runs.ledger(run).parameter(name)

    @app.get("/api/runs/{run}/contributions", summary="per step, per class signature, per layer: norm and share")
    def contributions(run: str) -> dict[str, Any]:
        ledger = runs.ledger(run)
        return {"layers": ledger.layer_names, "classes": ledger.run["classes"],
                "steps": [{"step": e["step"], "contributions": e["contributions"]} for e in ledger.steps]}

    @app.get("/api/runs/{run}/entropy", summary="entropy profiles: per class, per layer, at the steps measured")
    def entropy(run: str) -> dict[str, Any]:
        ledger = runs.ledger(run)
        config = ledger.run.get("entropy") or {}
        return {"layers": config.get("layers", []), "classes": config.get("classes", []),
                "profiles": [{"step": e["step"], "entropy": e["entropy"]} for e in ledger.steps if e.get("entropy")]}

    @app.get("/api/runs/{run}/certificate", summary="the run's deletion certificate (a run made by smalti forget)")
    def certificate(run: str) -> dict[str, Any]:
        from smalti.governance.certificate import CERTIFICATE

        path = runs.path(run) / CERTIFICATE
        if not path.is_file():
            raise NotFound(f"run {run!r} has no deletion certificate")
        return json.loads(path.read_text())

    @app.get("/api/runs/{run}/report", response_class=HTMLResponse, summary="the offline HTML audit report")
    def report(run: str) -> HTMLResponse:
        from smalti.governance.ledger.report import render_report
        from smalti.governance.ledger.verify import verify_ledger

        path = runs.path(run)
        runs.head(run)  # a run with a signed head
        verified = verify_ledger(path, workers=1, in_progress=True, read_only=True)
        return HTMLResponse(render_report(path, verified, read_only=True))

    @app.get("/api/access-log", summary="who read what: the access log's size, Merkle root and last records")
    def access(last: int = Query(20, ge=0, le=1000)) -> dict[str, Any]:
        return log.head(last)

    return app
