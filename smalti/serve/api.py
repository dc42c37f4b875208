"""The service's routes: module-level handlers on two routers (sessions; runs and the access log).

Each handler reads through ``Service`` (``request.app.state.service``). Handlers that scan a whole ledger
(forensic queries, the report, the heatmap's first build) hold one of a few ``heavy`` slots, so no number of
readers can make the service do more than that much of it at once. Integers in paths and queries are bounded
(a step of 2**63 is a 400, not an overflow).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from smalti.trust import merkle
from smalti.trust.note import verifier_key
from smalti.serve.auth import AuthError, Reader, Sessions
from smalti.serve.runs import BadRequest, NotFound, Unprocessable
from smalti.serve.service import Service

BIG = 2**53  # the largest integer a browser's JSON numbers hold exactly
RUN = Path(..., max_length=255, description="a run: the name of its folder")
sessions = APIRouter(prefix="/api", tags=["sessions"])
runs = APIRouter(prefix="/api", tags=["runs"])
reports = APIRouter(tags=["reports"])


async def service(request: Request) -> Service:  # async: FastAPI would run a plain def in a worker thread
    return request.app.state.service


async def reader(request: Request) -> Reader:
    return request.state.reader


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


# ---------------------------------------------------------------------------------------------- sessions


@sessions.get("/login/challenge", summary="a one-time challenge to sign with `smalti auditor sign-in` (no credential)")
def login_challenge(request: Request, svc: Service = Depends(service)) -> dict[str, Any]:
    try:
        challenge = svc.sessions.challenge(request.state.client)
    except AuthError as error:
        return _error(error.status, error.message)  # type: ignore[return-value]
    return {
        "challenge": challenge,
        "origin": svc.origin,
        "expires_in": Sessions.CHALLENGE_LIFETIME,
        "sign": "Ed25519 over 'smalti-login/v2\\n' + origin + '\\n' + challenge + '\\n', by an auditor key, "
        "outside the browser: smalti auditor sign-in ORIGIN --key KEY",
    }


@sessions.post(
    "/login",
    summary="exchange a sign-in code for a session: an HttpOnly cookie and a token for the "
    "X-Smalti-Session header, both needed on every request",
)
async def login(request: Request, svc: Service = Depends(service)) -> JSONResponse:
    try:
        body = json.loads(await request.body() or b"{}")
        code = body.get("code") if isinstance(body, dict) else None
        if not isinstance(code, str):
            raise AuthError(400, 'the body must be JSON {"code": "..."} with the code smalti auditor sign-in printed')
        who, token, binding = svc.sessions.login(code)
    except (ValueError, RecursionError):
        return _error(400, "the body is not JSON")
    except AuthError as error:
        return _error(error.status, error.message)
    request.state.reader = who
    response = JSONResponse(
        {
            "reader": who.name,
            "key_id": who.key_id,
            "expires_in": Sessions.LIFETIME,
            "session": binding,
            "header": "X-Smalti-Session",
        }
    )
    response.set_cookie(
        svc.cookie_name, token, max_age=Sessions.LIFETIME, httponly=True, samesite="strict", path="/", secure=svc.secure
    )
    return response


@sessions.post("/logout", summary="end this session, or every session of this reader (?everywhere=true)")
def logout(request: Request, everywhere: bool = False, svc: Service = Depends(service)) -> JSONResponse:
    ended = svc.sessions.logout(request.cookies.get(svc.cookie_name), request.headers.get(Sessions.HEADER), everywhere)
    response = JSONResponse({"ended": ended})
    response.delete_cookie(svc.cookie_name, path="/", secure=svc.secure, httponly=True, samesite="strict")
    return response


@sessions.get("/whoami", summary="who this credential is, and until when a session lasts")
def whoami(request: Request, who: Reader = Depends(reader), svc: Service = Depends(service)) -> dict[str, Any]:
    return {
        "reader": who.name,
        "key_id": who.key_id,
        "origin": svc.origin,
        "session": request.cookies.get(svc.cookie_name) is not None,
    }


# ---------------------------------------------------------------------------------------------- runs


@runs.get("/runs", summary="every run: its latest signed head, whether the taxonomy's trainer signed it, its parent")
def list_runs(svc: Service = Depends(service)) -> list[dict[str, Any]]:
    return [svc.run_summary(name) for name in svc.runs.names()]


@runs.get("/runs/{run}", summary="a run: classes, layers, latest head, trust, lineage, certificate")
def run_info(run: str = RUN, svc: Service = Depends(service)) -> dict[str, Any]:
    head, recorded = svc.runs.head(run)
    entry = svc.runs.run_entry(run, head)
    trust = svc.runs.trust(run, head, recorded)
    return {
        "run": run,
        "classes": entry["classes"],
        "layers": [layer["name"] for layer in entry["layers"]],
        "origin": head.origin,
        "trainer_key": recorded,
        "trust": trust.to_json(),
        "head": head.to_json(),
        "verifier_key": verifier_key(head.origin, trust.key.raw) if trust.key else None,
        "steps": head.size - 1,
        "lineage": svc.lineage(run),
        "deletion_certificate": svc.runs.file(run, "deletion-certificate.json") is not None,
    }


@runs.get(
    "/runs/{run}/checkpoint",
    response_class=PlainTextResponse,
    summary="the latest signed tree head as a C2SP checkpoint (signed note)",
)
def checkpoint(run: str = RUN, svc: Service = Depends(service)) -> PlainTextResponse:
    from smalti.trust.keys import PublicKey

    head, recorded = svc.runs.head(run)
    return PlainTextResponse(head.note(PublicKey.parse(recorded, f"run {run!r}: the recorded key").raw))


@runs.get("/runs/{run}/tile/{tile:path}", summary="a C2SP tlog-tiles tile or entry bundle at the latest head")
def tile(run: str = RUN, tile: str = Path(..., max_length=64), svc: Service = Depends(service)) -> Response:
    level, index, width = _parse_tile(tile)
    head, _ = svc.runs.head(run)
    return Response(svc.runs.tile(run, head, level, index, width, svc.heavy), media_type="application/octet-stream")


def _parse_tile(tile: str) -> tuple[str, int, int | None]:
    """``L/x001/234[.p/W]`` or ``entries/...``: the level, the tile index and the partial width (None: full)."""
    path, _, partial = tile.partition(".p/")
    parts = path.split("/")
    level, groups = parts[0], parts[1:]
    ok = (
        (level == "entries" or level in ("0", "1", "2", "3"))
        and groups
        and all(re.fullmatch(r"x[0-9]{3}", g) for g in groups[:-1])
        and re.fullmatch(r"[0-9]{3}", groups[-1])
    )
    if not ok or (partial and not (re.fullmatch(r"[0-9]{1,3}", partial) and 1 <= int(partial) <= 255)):
        raise NotFound(
            f"no tile {tile!r}: tiles are L/NNN or entries/NNN (x-prefixed groups of three digits), "
            f"with .p/W for a partial one"
        )
    return level, int("".join(g.lstrip("x") for g in groups)), int(partial) if partial else None


@runs.get("/runs/{run}/entries/{index}", summary="one ledger entry, decoded and as its exact bytes")
def entry(run: str = RUN, index: int = Path(..., ge=0, le=BIG), svc: Service = Depends(service)) -> dict[str, Any]:
    head, _ = svc.runs.head(run)
    step, leaf, data = svc.runs.entry(run, head, index)
    return {
        "index": index,
        "step": step,
        "leaf_hash": leaf.hex(),
        "entry_base64": base64.b64encode(data).decode(),
        "body": svc.runs._decode(run, index, data),
    }


@runs.get("/runs/{run}/proof/inclusion", summary="RFC 6962 inclusion proof of a step's entry in a signed tree")
async def inclusion(
    run: str = RUN,
    step: int = Query(..., ge=0, le=BIG, description="the optimizer step"),
    tree_size: int | None = Query(None, ge=1, le=BIG, description="a signed size (default: the latest)"),
    svc: Service = Depends(service),
) -> JSONResponse:
    """The service's hottest route, so it runs on the event loop: a read-only SQLite lookup of the head and
    the entry (a few indexed rows), and the audit path from the kept Merkle tree. Only building that tree
    (a whole-ledger read, once per signed head) goes to a worker thread, under a heavy slot."""
    with svc.runs.store(run) as store:  # one connection for the head, the entry's index and its bytes
        latest = store.latest_head()
        head = (
            latest if tree_size is None or latest is None or tree_size == latest.size else store.head_of_size(tree_size)
        )
        found = store.entry_at_step(step)
    if latest is None:
        raise NotFound(f"run {run!r} has no signed tree head yet")
    if head is None:
        raise BadRequest(f"tree_size={tree_size}: the ledger signed no head of that size (latest {latest.size})")
    if found is None or found[0] >= head.size:
        raise BadRequest(f"step {step}: no entry under the signed head of size {head.size}")
    index, leaf, data = found
    kept = svc.runs.kept_tree(run, latest)
    tree = kept if kept is not None else await run_in_threadpool(svc.tree, run, latest)
    if tree.root(0, head.size) != head.root or tree.levels[0][index] != merkle.leaf_hash(data):
        raise Unprocessable(f"run {run!r}: its signed head of size {head.size} does not match its entries")
    proof = tree.inclusion_proof(index, head.size)
    return JSONResponse(
        {
            "step": step,
            "leaf_index": index,
            "tree_size": head.size,
            "entry_base64": base64.b64encode(data).decode(),
            "leaf_hash": leaf.hex(),
            "audit_path": [p.hex() for p in proof],
            "tree_head": head.to_json(),
        }
    )


@runs.get("/runs/{run}/proof/consistency", summary="RFC 6962 consistency proof between two tree sizes")
def consistency(
    run: str = RUN,
    first: int = Query(..., ge=1, le=BIG),
    second: int | None = Query(None, ge=1, le=BIG),
    svc: Service = Depends(service),
) -> dict[str, Any]:
    head, _ = svc.runs.head(run)
    second = head.size if second is None else second
    if not first <= second <= head.size:
        raise BadRequest(f"first={first}, second={second}: need 0 < first <= second <= {head.size}")
    tree = svc.tree(run, head)
    return {
        "first": first,
        "second": second,
        "first_root": tree.root(0, first).hex(),
        "second_root": tree.root(0, second).hex(),
        "proof": [p.hex() for p in tree.consistency_proof(first, second)],
    }


NAME = Query(..., min_length=1, max_length=1000)


async def _answer(svc: Service, run: str, question: tuple[Any, ...], ask: Any) -> Any:
    """A kept answer straight from the event loop; a new one computed in a worker thread under a heavy slot."""
    kept = svc.kept_answer(run, question)
    return kept if kept is not None else await run_in_threadpool(svc.query, run, question, ask)


@runs.get("/runs/{run}/audit/layer", summary="which classes reached a layer, how much, how often")
async def audit_layer(run: str = RUN, name: str = NAME, svc: Service = Depends(service)) -> dict[str, Any]:
    return await _answer(svc, run, ("layer", name), lambda ledger: ledger.layer(name))


@runs.get("/runs/{run}/audit/class", summary="which layers a class (or taxonomy node) reached, in which steps")
async def audit_class(run: str = RUN, name: str = NAME, svc: Service = Depends(service)) -> dict[str, Any]:
    return await _answer(svc, run, ("class", name), lambda ledger: ledger.for_class(name))


@runs.get("/runs/{run}/audit/example", summary="which steps and layers an example (its ledger index) reached")
async def audit_example(
    run: str = RUN, index: int = Query(..., ge=0, le=BIG), svc: Service = Depends(service)
) -> dict[str, Any]:
    return await _answer(svc, run, ("example", index), lambda ledger: ledger.example(index))


@runs.get("/runs/{run}/audit/param", summary="as audit/layer, for the layer holding a parameter")
async def audit_param(run: str = RUN, name: str = NAME, svc: Service = Depends(service)) -> dict[str, Any]:
    return await _answer(svc, run, ("param", name), lambda ledger: ledger.parameter(name))


@runs.get(
    "/runs/{run}/contributions", summary="per step, class signature and layer: norm and share (a page of entries)"
)
def contributions(
    run: str = RUN,
    start: int = Query(1, ge=1, le=BIG, description="the first entry index"),
    limit: int = Query(100, ge=1, le=500),
    svc: Service = Depends(service),
) -> dict[str, Any]:
    head, _ = svc.runs.head(run)
    steps = [
        {"index": start + i, "step": body["step"], "contributions": body["contributions"]}
        for i, body in enumerate(svc.runs.steps(run, head, start, start + limit))
    ]
    following = start + limit if start + limit < head.size else None
    return {"entries": head.size - 1, "start": start, "next": following, "steps": steps}


@runs.get("/runs/{run}/contributions/summary", summary="each layer's gradient shares per class, summed up to a step")
def contribution_summary(
    run: str = RUN, upto_step: int | None = Query(None, ge=0, le=BIG), svc: Service = Depends(service)
) -> dict[str, Any]:
    head, _ = svc.runs.head(run)
    return svc.heavy(lambda: svc.runs.summary(run, head, upto_step))


@runs.get("/runs/{run}/entropy", summary="entropy profiles: per class and layer, at up to max_profiles measured steps")
def entropy(
    run: str = RUN, max_profiles: int = Query(200, ge=1, le=1000), svc: Service = Depends(service)
) -> dict[str, Any]:
    return svc.entropy(run, max_profiles)


@runs.get("/runs/{run}/certificate", summary="the deletion certificate and the exact bytes its signature covers")
def certificate(run: str = RUN, svc: Service = Depends(service)) -> dict[str, Any]:
    content, message = svc.runs.certificate(run)
    return {
        "certificate": content,
        "signed_message_base64": base64.b64encode(message).decode(),
        "signature": content.get("signature"),
        "key_id": content.get("key_id"),
    }


@runs.get(
    "/runs/{run}/evaluations",
    summary="the run's evaluation attestations, each checked against the taxonomy's evaluators",
)
def evaluations(run: str = RUN, svc: Service = Depends(service)) -> list[dict[str, Any]]:
    return svc.runs.evaluations(run)


@runs.get(
    "/runs/{run}/report",
    response_class=HTMLResponse,
    summary="the HTML audit report (checked against the taxonomy's trainer key)",
)
def report(run: str = RUN, svc: Service = Depends(service)) -> HTMLResponse:
    return HTMLResponse(svc.report(run))


@runs.get("/runs/{run}/report-ticket", summary="a one-minute, one-use URL that opens the report in a browser")
def report_ticket(run: str = RUN, who: Reader = Depends(reader), svc: Service = Depends(service)) -> dict[str, Any]:
    svc.runs.path(run)
    try:
        token = svc.sessions.ticket(who, run)
    except AuthError as error:
        return _error(error.status, error.message)  # type: ignore[return-value]
    return {"url": f"/report/{token}", "expires_in": Sessions.TICKET_LIFETIME}


@reports.get("/report/{ticket}", response_class=HTMLResponse, include_in_schema=False)
def report_by_ticket(
    request: Request, ticket: str = Path(..., max_length=64), svc: Service = Depends(service)
) -> HTMLResponse:
    found = svc.sessions.redeem(ticket)
    if found is None:
        raise NotFound("unknown, used or expired report ticket: open the report from the page again")
    request.state.reader, request.state.report_run = found.reader, found.run
    return HTMLResponse(svc.report(found.run))


@runs.get("/access-log", summary="who read what: the access log's signed checkpoint and last records")
def access(last: int = Query(20, ge=0, le=1000), svc: Service = Depends(service)) -> dict[str, Any]:
    return svc.access_log.head(last) | {"verifier_key": svc.access_verifier}


@runs.get("/access-log/proof/consistency", summary="RFC 6962 consistency proof between two sizes of the access log")
def access_consistency(
    first: int = Query(..., ge=1, le=BIG), second: int = Query(..., ge=1, le=BIG), svc: Service = Depends(service)
) -> dict[str, Any]:
    if not first <= second <= svc.access_log.size:
        raise BadRequest(f"first={first}, second={second}: need 0 < first <= second <= {svc.access_log.size}")
    proof = svc.heavy(lambda: svc.access_log.consistency(first, second))  # reads the log's leaves: one slot
    return {"first": first, "second": second, "proof": [p.hex() for p in proof]}
