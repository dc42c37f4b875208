"""`smalti serve` through a real server on loopback, attacked as the audited party (who writes the run folder)
or anyone who reaches the port would: real signed requests (RFC 9421, by the http-message-signatures library as
any client would sign), every credential case, requests bound to this service, hostile run folders (a ledger
re-signed by an outsider, symbolic links, a broken ledger), bad input, the access log, and a run left byte for
byte as it was. The UI and the report in a real browser are in test_serve_ui.py; cost bounds in
test_serve_limits.py."""

from __future__ import annotations

import base64
import datetime
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port, smalti_cli, wait_for_port
from serve_helpers import Client, make_audit_taxonomy, serving, sign_in_code
from test_c2sp import go, go_check  # noqa: F401 (a session fixture: the Go tlog client)
from test_ledger import train


@pytest.fixture(scope="module")
def service(governed, tmp_path_factory):
    """Runs (a governed one; a copy re-signed by an outsider's key), a taxonomy naming an auditor, and
    `smalti serve` on loopback; stopped after the module."""
    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey

    root = tmp_path_factory.mktemp("serve")
    runs = root / "runs"
    train(governed, runs / "alpha", train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"})
    taxonomy = make_audit_taxonomy(governed, root)
    import shutil

    shutil.copytree(runs / "alpha", runs / "resigned")
    outsider = SigningKey.load(root / "keys" / "outsider.key")
    grow_ledger(runs / "resigned", 6, outsider)  # the same entries, heads signed by a key the taxonomy never named
    with sqlite3.connect(runs / "resigned" / "ledger.sqlite") as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'trainer_public_key'", (outsider.public.text,))
    with serving(runs, taxonomy, governed.trust, "--header-timeout", "2") as (base, process):
        yield base, runs, root / "keys" / "auditor.key", process, taxonomy


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_every_credential_case_gets_its_status(service, governed):
    base, runs, auditor, _, _ = service
    assert Client(base, None).get("/api/runs").status_code == 401
    ok = Client(base, auditor).get("/api/runs")
    assert ok.status_code == 200 and ok.json()[0]["run"] == "alpha" and ok.json()[0]["final"] is True
    trainer = Client(base, governed.key("trainer")).get("/api/runs")  # a valid key, not an auditor's
    assert trainer.status_code == 403 and "not an auditor" in trainer.json()["error"]
    outsider = Client(base, auditor.parent / "outsider.key").get("/api/runs")  # a key nobody named
    assert outsider.status_code == 401 and outsider.json()["error"].startswith("signature refused: ")
    assert len(outsider.json()["error"]) > len("signature refused: ") + 10  # it says why

    client = Client(base, auditor)
    prepared, first = client.request("GET", "/api/runs/alpha")
    assert first.status_code == 200
    replayed = client.session.send(prepared)  # the very same signed request again
    assert replayed.status_code == 401 and "replayed" in replayed.json()["error"]
    old = client.get("/api/runs", created=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1))
    assert old.status_code == 401
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/api/runs/alpha")[1].status_code == 405
    mangled = requests.Request("GET", base + "/api/runs", headers={"Signature-Input": "sig=(garbage", "Signature":
                                                                     "sig=:AAAA:"}).prepare()
    bad = client.session.send(mangled)
    assert bad.status_code == 401 and bad.json()["error"].startswith("signature refused: ")
    assert client.get("/openapi.json").json()["info"]["title"] == "Smalti audit service"


def test_a_signature_made_before_the_service_started_is_refused_as_a_replay_across_a_restart(service):
    base, _, auditor, _, _ = service
    client = Client(base, auditor)
    # Signed (with a fresh nonce) four minutes ago, before this server process started: within the five minutes a
    # signature lives, so only the start-time rule refuses it (an earlier process's nonces are not kept).
    before = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=4)
    refused = client.get("/api/runs", created=before)
    assert refused.status_code == 401 and "before this service started" in refused.json()["error"]


def test_requests_and_sign_ins_are_bound_to_this_services_origin(service):
    base, _, auditor, _, _ = service
    other = "http://other-service.example"
    relayed = Client(base, auditor, signed_for=other).get("/api/runs")  # Host: other-service.example
    assert relayed.status_code == 421 and "other-service.example" in relayed.json()["error"]
    # Signed for the other service, but sent with this one's Host header: the signed @target-uri differs.
    prepared, _ = Client(base, auditor, signed_for=other).request("GET", "/api/runs/alpha")
    prepared.headers["Host"] = base.split("//")[1]
    forwarded = requests.Session().send(prepared, timeout=30)
    assert forwarded.status_code == 401, forwarded.text
    # A sign-in code signed for another service does not sign in here.
    code = sign_in_code(base, auditor, origin=other)
    refused = requests.post(base + "/api/login", json={"code": code}, timeout=30)
    assert refused.status_code == 401 and "for http://127.0.0.1" in refused.json()["error"]
    # X-Forwarded-Proto is not trusted: the origin is configured, and the cookie stays as the origin says.
    good = requests.post(base + "/api/login", json={"code": sign_in_code(base, auditor)},
                         headers={"X-Forwarded-Proto": "https"}, timeout=30)
    assert good.status_code == 200 and "secure" not in good.headers["set-cookie"].lower()


def test_browser_sessions_sign_in_out_and_revoke_everywhere(service):
    base, _, auditor, _, _ = service
    sessions = [requests.Session() for _ in range(3)]
    for s in sessions:
        answer = s.post(base + "/api/login", json={"code": sign_in_code(base, auditor)}, timeout=30)
        assert answer.status_code == 200 and answer.json()["reader"] == "auditor-one"
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert cookie.startswith("smalti_session_")  # named per origin: a service on another port has its own
        assert answer.json()["session"] not in cookie  # the header's half is not the cookie's
        cookie_only = s.get(base + "/api/whoami", timeout=30)  # what a page on another port of this host would hold
        assert cookie_only.status_code == 401
        header_only = requests.get(base + "/api/whoami", headers={"X-Smalti-Session": answer.json()["session"]},
                                   timeout=30)  # what script in the page could read
        assert header_only.status_code == 401
        s.headers["X-Smalti-Session"] = answer.json()["session"]
        assert s.get(base + "/api/whoami", timeout=30).json()["reader"] == "auditor-one"
    code = sign_in_code(base, auditor)
    assert requests.post(base + "/api/login", json={"code": code}, timeout=30).status_code == 200
    reused = requests.post(base + "/api/login", json={"code": code}, timeout=30)
    assert reused.status_code == 401 and "used" in reused.json()["error"]
    for body, status in (({"code": "x"}, 400), ({"nope": 1}, 400)):
        assert requests.post(base + "/api/login", json=body, timeout=30).status_code == status
    assert requests.post(base + "/api/login", data="code=x", timeout=30).status_code == 415
    nested = requests.post(base + "/api/login", data="[" * 3000, headers={"Content-Type": "application/json"},
                           timeout=30)
    assert nested.status_code == 400 and nested.json()["error"] == "the body is not JSON"
    assert sessions[0].post(base + "/api/logout", json={}, timeout=30).json()["ended"] == 1
    assert sessions[0].get(base + "/api/runs", timeout=30).status_code == 401  # its cookie is gone
    assert sessions[1].post(base + "/api/logout?everywhere=true", json={}, timeout=30).json()["ended"] >= 2
    revoked = sessions[2].get(base + "/api/runs", timeout=30)  # still sends its cookie, which no longer holds
    assert revoked.status_code == 401 and "sign in again" in revoked.json()["error"]


def test_the_session_and_challenge_stores_are_bounded():
    from smalti.trust.keys import SigningKey
    from smalti.trust.taxonomy import Authority, Taxonomy
    from smalti.serve.auth import AuthError, RequestAuthenticator, Sessions, login_message

    key = SigningKey.generate()
    taxonomy = Taxonomy("t", ["a"], {"aud": Authority("aud", "auditor", key.public)}, frozenset(), "")
    sessions = Sessions(RequestAuthenticator(taxonomy, "http://x"))
    sessions.MAX_CHALLENGES, sessions.MAX_CHALLENGES_PER_CLIENT = 5, 2
    sessions.challenge("a"), sessions.challenge("a")
    with pytest.raises(AuthError) as one_client:
        sessions.challenge("a")  # one address cannot hold every challenge
    assert one_client.value.status == 429
    challenges = [sessions.challenge(f"c{i}") for i in range(3)]
    with pytest.raises(AuthError) as full:
        sessions.challenge("d")
    assert full.value.status == 503

    def code(challenge: str) -> str:
        signature = base64.urlsafe_b64encode(key.sign(login_message("http://x", challenge))).decode().rstrip("=")
        return f"{challenge}.{key.public.key_id}.{signature}"

    made = [sessions.login(code(c))[1:] for c in challenges]
    assert sessions.reader(made[0][0], made[0][1]) is not None
    assert sessions.reader(made[0][0], made[1][1]) is None and sessions.reader(made[0][0], None) is None
    sessions.MAX_SESSIONS_PER_READER = 2
    sessions.login(code(sessions.challenge("e")))
    assert sessions.count() == 2 and sessions.reader(*made[0]) is None and sessions.reader(*made[-1]) is not None


def test_the_refusal_throttle_keeps_counting_past_its_table():
    from smalti.serve.auth import RefusalThrottle
    from smalti.serve.service import normal_address

    throttle = RefusalThrottle(limit=3, clients=2)
    for client in ("a", "b"):
        throttle.failed(client)
    for _ in range(3):
        throttle.failed("fresh-1")  # the table is full: counted with every address not in it
    assert throttle.blocked("fresh-2") and not throttle.blocked("a")
    assert normal_address("2001:db8::1") == normal_address("2001:db8::ffff") == "2001:db8::/64"
    assert normal_address("::ffff:127.0.0.1") == "127.0.0.1"


def test_a_burst_across_a_minute_boundary_is_still_refused():
    from smalti.serve.auth import RefusalThrottle

    now = [100.0]
    throttle = RefusalThrottle(limit=10, window=60.0, clock=lambda: now[0])
    now[0] = 159.0
    for _ in range(6):
        throttle.failed("a")
    now[0] = 161.0  # the minute turned: a fixed window would forget the six
    for _ in range(5):
        throttle.failed("a")
    assert throttle.blocked("a")
    now[0] = 161.0 + 60.0  # a minute of quiet: this minute's five now weigh less than the limit
    assert not throttle.blocked("a")
    now[0] = 400.0  # long quiet: nothing left
    assert not throttle.blocked("a") and throttle._previous == {} and throttle._current == {}


def test_a_run_signed_by_a_key_the_taxonomy_never_named_is_untrusted_everywhere(service):
    base, _, auditor, _, _ = service
    client = Client(base, auditor)
    listed = {r["run"]: r for r in client.get("/api/runs").json()}
    assert listed["alpha"]["trust"]["trusted"] is True and listed["alpha"]["trust"]["trainer"] == "trainer"
    resigned = listed["resigned"]["trust"]
    assert resigned["trusted"] is False and "not by a trainer the taxonomy names" in resigned["reason"]
    assert client.get("/api/runs/resigned").json()["trust"]["trusted"] is False
    report = client.get("/api/runs/resigned/report").text
    assert "NOT TRUSTED" in report and "VERIFIED:" not in report
    assert "VERIFIED:" in client.get("/api/runs/alpha/report").text


def test_proofs_tiles_and_queries_hold_and_bad_input_is_a_json_error(service):
    from smalti.trust import merkle
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.governance.ledger.tiles import tiles

    base, runs, auditor, _, _ = service
    client = Client(base, auditor)
    info = client.get("/api/runs/alpha").json()
    assert info["head"]["final"] and len(info["layers"]) > 0 and info["trust"]["trusted"]
    proof = client.get("/api/runs/alpha/proof/inclusion?step=3").json()
    leaf = merkle.leaf_hash(base64.b64decode(proof["entry_base64"]))
    assert merkle.verify_inclusion(proof["leaf_index"], proof["tree_size"], leaf,
                                   [bytes.fromhex(p) for p in proof["audit_path"]], bytes.fromhex(proof["tree_head"]["root"]))
    size = proof["tree_size"]
    with LedgerStore(ledger_path(runs / "alpha"), read_only=True) as store:
        heads, leaves = store.heads(), store.leaves()
        expected_tiles = {path: data for path, data, _ in tiles(leaves, lambda a, b: [r[3] for r in store.rows(a, b)])}
    older = heads[0]
    at_older = client.get(f"/api/runs/alpha/proof/inclusion?step=1&tree_size={older.size}").json()
    assert at_older["tree_size"] == older.size and merkle.verify_inclusion(
        at_older["leaf_index"], older.size, merkle.leaf_hash(base64.b64decode(at_older["entry_base64"])),
        [bytes.fromhex(p) for p in at_older["audit_path"]], older.root)
    consistency = client.get(f"/api/runs/alpha/proof/consistency?first=3&second={size}").json()
    assert merkle.verify_consistency(3, size, [bytes.fromhex(p) for p in consistency["proof"]],
                                     merkle.root(leaves[:3]), merkle.root(leaves[:size]))
    checkpoint = client.get("/api/runs/alpha/checkpoint").text
    assert checkpoint.splitlines()[1] == str(size)
    for path, data in expected_tiles.items():  # every tile and bundle, byte for byte what publishing writes
        assert client.get(f"/api/runs/alpha/{path}").content == data, path
    layer = info["layers"][0]
    assert client.get(f"/api/runs/alpha/audit/layer?name={layer}").json()["layer"] == layer
    assert "layers_touched" in client.get(f"/api/runs/alpha/audit/class?name={info['classes'][0]}").json()
    page = client.get("/api/runs/alpha/contributions?start=2&limit=2").json()
    assert [s["index"] for s in page["steps"]] == [2, 3] and page["next"] == 4
    summary = client.get("/api/runs/alpha/contributions/summary?upto_step=3").json()
    assert summary["upto_step"] == 3 and summary["entries"] == 3
    assert all(not any(o.startswith(c + "/") for o in summary["classes"]) for c in summary["classes"])  # no nodes
    assert client.get("/api/runs/alpha/report").text.startswith("<!DOCTYPE html>")
    for path, status, fragment in (
            ("/api/runs/alpha/proof/inclusion?step=999", 400, "no entry under the signed head"),
            ("/api/runs/alpha/proof/inclusion?step=9223372036854775808", 400, "step"),
            ("/api/runs/alpha/proof/inclusion?step=1&tree_size=4", 400, "signed no head of that size"),
            ("/api/runs/alpha/entries/99999", 400, "out of range"),
            ("/api/runs/alpha/entries/99999999999999999999", 400, "index"),
            ("/api/runs/alpha/audit/class?name=gutenberg/nothing", 400, "no class or node"),
            ("/api/runs/alpha/proof/inclusion?step=abc", 400, "step"),
            ("/api/runs/alpha/tile/0/000", 404, "partial"),
            ("/api/runs/alpha/tile/0/x12", 404, "no tile"),
            ("/api/runs/alpha/tile/entries/000.p/300", 404, "no tile"),
            ("/api/runs/../alpha", 404, ""),
            ("/api/runs/%2e%2e/%2e%2e/etc/passwd", 404, ""),
            ("/api/runs/..%2f..%2fetc%2fpasswd/checkpoint", 404, ""),
            ("/api/runs/nosuchrun", 404, "no run named"),
            ("/api/runs/alpha/certificate", 404, "no deletion certificate")):
        answer = client.get(path)
        assert answer.status_code == status, (path, answer.status_code, answer.text[:200])
        assert answer.headers["content-type"].startswith("application/json"), path
        assert fragment in answer.json()["error"] and "Traceback" not in answer.text, path


def test_statuses_headers_and_methods(service):
    base, _, auditor, _, _ = service
    client = Client(base, auditor)
    answer = client.get("/api/runs")
    assert "server" not in {k.lower() for k in answer.headers}
    assert answer.headers["cache-control"] == "no-store" and answer.headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    head = client.request("HEAD", "/api/runs/alpha/checkpoint")[1]
    assert head.status_code == 200 and head.content == b""
    ui = requests.get(base + "/ui/", timeout=30)
    csp = ui.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    report = client.get("/api/runs/alpha/report").headers["content-security-policy"]
    assert "sandbox" in report and "script-src" not in report and "default-src 'none'" in report
    big = client.get("/api/runs", headers={"X-Padding": "x" * 40_000})  # over 16 KiB: the app's JSON 431
    assert big.status_code == 431 and big.json()["status"] == 431
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:  # over 64 KiB: the server's, still JSON
        # Just past the limit, and all of it read by the server before it answers (bytes left unread would turn
        # its close into a reset that can discard the answer).
        raw.sendall(b"GET /api/runs HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 66_000)
        reply = b""
        while chunk := raw.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 431") and json.loads(reply.split(b"\r\n\r\n", 1)[1])["status"] == 431


def test_a_session_of_requests_leaves_every_run_byte_for_byte_and_creates_nothing(service):
    base, runs, auditor, _, _ = service
    before, stamp = _bytes(runs / "alpha"), os.stat(runs / "alpha").st_mtime_ns
    client = Client(base, auditor)
    for path in ("/api/runs", "/api/runs/alpha", "/api/runs/alpha/checkpoint", "/api/runs/alpha/entries/1",
                 "/api/runs/alpha/proof/inclusion?step=2", "/api/runs/alpha/audit/layer?name=tok_emb",
                 "/api/runs/alpha/entropy", "/api/runs/alpha/contributions", "/api/runs/alpha/contributions/summary",
                 "/api/runs/alpha/report", "/api/runs/alpha/tile/entries/000.p/7"):
        assert client.get(path).status_code == 200, path
    assert _bytes(runs / "alpha") == before  # -wal and -shm included: none was created
    assert os.stat(runs / "alpha").st_mtime_ns == stamp


def test_symbolic_links_out_of_the_folder_are_refused(service, tmp_path):
    base, runs, auditor, _, _ = service
    import shutil

    outside = tmp_path / "outside-run"
    shutil.copytree(runs / "alpha", outside)
    (runs / "linked").symlink_to(outside, target_is_directory=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": "outside the runs folder"}')
    shutil.copytree(runs / "alpha", runs / "certlink")
    (runs / "certlink" / "deletion-certificate.json").symlink_to(secret)
    try:
        client = Client(base, auditor)
        assert "linked" not in {r["run"] for r in client.get("/api/runs").json()}
        assert client.get("/api/runs/linked").status_code == 404
        certificate = client.get("/api/runs/certlink/certificate")
        assert certificate.status_code == 404 and "secret" not in certificate.text
        assert client.get("/api/runs/certlink").json()["deletion_certificate"] is False
    finally:
        (runs / "linked").unlink()
        shutil.rmtree(runs / "certlink")


def test_no_absolute_path_of_the_server_leaves_it(service, governed, tmp_path):
    base, runs, auditor, _, _ = service
    from smalti.governance.lineage import Link

    child = runs / "child"
    config_parent = str(runs / "alpha")
    train(governed, child, train={"max_duration": "2ba"}, init={"from_run": config_parent, "trust":
                                                                 str(governed.keys / "trainer.pub")})
    try:
        client = Client(base, auditor)
        info = client.get("/api/runs/child").json()
        assert info["lineage"] and info["lineage"][0]["run"] == "alpha" and info["lineage"][0]["kind"] == "init"
        listed = {r["run"]: r for r in client.get("/api/runs").json()}
        assert listed["child"]["parent"] == "alpha" and listed["child"]["link"] == "init"
        for text in (json.dumps(info), client.get("/api/runs/child/report").text, json.dumps(listed)):
            assert str(runs) not in text and str(runs.resolve()) not in text
        assert Link  # the link type the run entry records
    finally:
        import shutil

        shutil.rmtree(child)


def test_the_access_log_records_what_was_read_and_is_a_signed_log(service, tmp_path):
    from smalti.trust import merkle
    from smalti.trust.note import Checkpoint, Verifier, open_note

    base, runs, auditor, _, _ = service
    client = Client(base, auditor)
    first = client.get("/api/access-log?last=0").json()
    assert client.get("/api/runs/alpha/proof/inclusion?step=2").status_code == 200
    session = requests.Session()
    assert session.post(base + "/api/login", json={"code": sign_in_code(base, auditor)}, timeout=30).ok
    log = client.get("/api/access-log?last=10").json()
    records = log["last"]
    proof_read = [r for r in records if r.get("path") == "/api/runs/alpha/proof/inclusion"]
    assert proof_read and proof_read[-1]["query"] == "step=2" and proof_read[-1]["reader"] == "auditor-one"
    signed_in = [r for r in records if r.get("event") == "sign-in"]
    assert signed_in and signed_in[-1]["reader"] == "auditor-one" and signed_in[-1]["query"] == ""
    text, _ = open_note(log["checkpoint"], [Verifier.parse(log["verifier_key"])])
    checkpoint = Checkpoint.parse(text)
    assert checkpoint.size == log["size"] and checkpoint.root.hex() == log["root"]
    old = Checkpoint.parse(open_note(first["checkpoint"], [Verifier.parse(first["verifier_key"])])[0])
    proof = client.get(f"/api/access-log/proof/consistency?first={old.size}&second={checkpoint.size}").json()
    assert merkle.verify_consistency(old.size, checkpoint.size, [bytes.fromhex(p) for p in proof["proof"]],
                                     old.root, checkpoint.root)


FAULTY_SERVICE = """
import sys
import smalti.serve.service as service

def broken(self, run):
    raise RuntimeError("an injected fault")

service.Service.lineage = broken  # /api/runs/RUN fails inside the route; nothing else does
from smalti.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_an_internal_error_is_a_json_500_and_recorded(service, governed, tmp_path):
    """A fault injected into a real server process (the service's own code raising mid-route)."""
    _, runs, auditor, _, taxonomy = service
    port = free_port()
    launcher = tmp_path / "faulty.py"
    launcher.write_text(FAULTY_SERVICE)
    process = subprocess.Popen([sys.executable, str(launcher), "serve", str(runs), "--taxonomy", str(taxonomy),
                                "--trust", str(governed.trust), "--listen", f"127.0.0.1:{port}",
                                "--access-log", str(tmp_path / "access.sqlite")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        wait_for_port(port, process)
        client = Client(f"http://127.0.0.1:{port}", auditor)
        answer = client.get("/api/runs/alpha")
        assert answer.status_code == 500 and answer.json() == {"error": "internal error (RuntimeError)", "status": 500}
        records = client.get("/api/access-log?last=5").json()["last"]
        assert any(r.get("path") == "/api/runs/alpha" and r["status"] == 500 for r in records)
    finally:
        process.terminate()
        process.wait(timeout=20)


def _hostile_ledger(run: Path, view: str) -> None:
    """A ledger whose ``view`` table (meta or heads) is a recursive view that never ends."""
    from smalti import formats

    run.mkdir()
    (run / "recipe.yaml").write_text("seed: 1\n")
    tables = {"meta": "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
              "entries": "CREATE TABLE entries (idx INTEGER PRIMARY KEY, step INTEGER NOT NULL, leaf BLOB NOT NULL, "
                         "data BLOB NOT NULL)",
              "heads": "CREATE TABLE heads (size INTEGER PRIMARY KEY, root BLOB NOT NULL, timestamp TEXT NOT NULL, "
                       "final INTEGER NOT NULL, key_id TEXT NOT NULL, signature BLOB NOT NULL, weights TEXT NOT NULL)"}
    forever = {"meta": "CREATE VIEW meta AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
                       "SELECT 'k' || x AS key, x AS value FROM n",
               "heads": "CREATE VIEW heads AS WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
                        "SELECT x AS size, x AS root, '' AS timestamp, 0 AS final, '' AS key_id, x AS signature, "
                        "'' AS weights FROM n WHERE x < 0"}
    with sqlite3.connect(run / "ledger.sqlite") as db:
        for name, sql in tables.items():
            db.execute(forever[view] if name == view else sql)
        if view != "meta":
            db.execute("INSERT INTO meta VALUES ('format', ?)", (formats.LEDGER,))


def test_hostile_ledgers_and_odd_input_are_refused_quickly_not_500_or_hung(service, governed, tmp_path):
    import shutil

    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey

    base, runs, auditor, _, _ = service
    _hostile_ledger(runs / "hostile", "heads")
    _hostile_ledger(runs / "hostile-meta", "meta")
    shutil.copytree(runs / "alpha", runs / "shmlink")
    (runs / "shmlink" / "ledger.sqlite-shm").symlink_to(tmp_path / "elsewhere-shm")
    shutil.copytree(runs / "alpha", runs / "strays")
    (runs / "strays" / "ledger.sqlite-wal").write_bytes(b"")  # a stray -wal: still nothing created beside it
    shutil.copytree(runs / "alpha", runs / "nested")
    deep = b"[" * 100_000 + b"]" * 100_000

    def nest(index: int, data: bytes) -> bytes:  # a body no JSON encoder would write; signed all the same
        return data[:-1] + b',"deep":' + deep + b"}" if index in (0, 2) else data

    grow_ledger(runs / "nested", 6, SigningKey.load(governed.key("trainer")), raw=nest)
    (runs / "garbage").mkdir()
    (runs / "garbage" / "recipe.yaml").write_text("seed: 1\n")
    (runs / "garbage" / "ledger.sqlite").write_bytes(b"not a database at all" * 100)
    try:
        client = Client(base, auditor)
        started = time.time()
        for name in ("hostile", "hostile-meta"):
            answer = client.get(f"/api/runs/{name}")
            assert answer.status_code == 422 and "is a view" in answer.json()["error"], answer.text
        listed = {r["run"]: r for r in client.get("/api/runs").json()}
        assert listed["hostile-meta"]["trust"]["trusted"] is False and time.time() - started < 10
        assert listed["nested"]["trust"]["trusted"] is False  # its run entry is refused; the listing still answers
        assert str(runs) not in listed["garbage"]["trust"]["reason"] and "garbage/ledger.sqlite" in \
            listed["garbage"]["trust"]["reason"]
        nested = client.get("/api/runs/nested/entries/2")
        assert nested.status_code == 422 and "nested too deeply" in nested.json()["error"]
        linked = client.get("/api/runs/shmlink/checkpoint")
        assert linked.status_code == 422 and "not a plain file" in linked.json()["error"]
        assert not (tmp_path / "elsewhere-shm").exists()
        assert client.get("/api/runs/strays/checkpoint").status_code == 200
        assert not (runs / "strays" / "ledger.sqlite-shm").exists()
        assert client.get("/api/runs/alpha/tile/entries/000.p/%C2%B2").status_code == 404  # a Unicode digit
    finally:
        for name in ("hostile", "hostile-meta", "shmlink", "strays", "nested", "garbage"):
            shutil.rmtree(runs / name)


def test_sign_in_bodies_are_bounded_in_size_and_time(service):
    base, _, _, _, _ = service
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:  # a chunked body of any size
        raw.sendall(b"POST /api/login HTTP/1.1\r\nHost: " + base.split("//")[1].encode() +
                    b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 411")
    started = time.time()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:  # a body that never comes
        raw.sendall(b"POST /api/login HTTP/1.1\r\nHost: " + base.split("//")[1].encode() +
                    b"\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{")
        reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 408") and time.time() - started < 10  # the test server gives 2 seconds
    too_big = requests.post(base + "/api/login", data="x" * 5000, headers={"Content-Type": "application/json"},
                            timeout=30)
    assert too_big.status_code == 413


def test_behind_a_configured_proxy_one_client_cannot_get_another_refused(service, governed, tmp_path):
    _, runs, auditor, _, taxonomy = service
    with serving(runs, taxonomy, governed.trust, "--origin", "https://audit.example", "--proxy", "127.0.0.1",
                 "--access-log", str(tmp_path / "access.sqlite")) as (base, _):
        proxy = {"Host": "audit.example"}
        for _ in range(610):  # one client behind the proxy, refused until it is throttled
            requests.get(base + "/api/runs", headers={**proxy, "X-Forwarded-For": "203.0.113.7"}, timeout=30)
        blocked = requests.get(base + "/api/runs", headers={**proxy, "X-Forwarded-For": "203.0.113.7"}, timeout=30)
        assert blocked.status_code == 429
        other = requests.get(base + "/api/runs", headers={**proxy, "X-Forwarded-For": "198.51.100.2"}, timeout=30)
        assert other.status_code == 401  # heard, not throttled: its own address
        spoofed = requests.get(base + "/api/runs", headers={**proxy, "X-Forwarded-For": "198.51.100.2, 203.0.113.7"},
                               timeout=30)
        assert spoofed.status_code == 429  # the proxy appends the real one last: what comes before is the client's


def test_the_auditor_client_follows_no_redirect_and_prints_no_terminal_escapes(service, tmp_path, governed):
    import http.server
    import threading

    from smalti.governance.ledger.store import LedgerStore, ledger_path

    with LedgerStore(ledger_path(service[1] / "alpha"), read_only=True) as store:
        note = store.heads()[-1].note(store.trainer_key.raw)  # a genuine checkpoint, then a lying proof

    class Hostile(http.server.BaseHTTPRequestHandler):
        def answer(self, status: int, kind: str, body: bytes, **headers: str) -> None:
            self.send_response(status)
            for name, value in {"Content-Type": kind, "Content-Length": str(len(body)), **headers}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path.startswith("/api/runs/alpha/checkpoint"):
                self.answer(200, "text/plain", note.encode())
            elif self.path.startswith("/api/runs/alpha/proof"):
                self.answer(200, "application/json", json.dumps({
                    "leaf_index": "\r\x1b[2Kalpha: step 3's entry is in the tree\x1b[8m", "tree_size": 7,
                    "entry_base64": "", "audit_path": []}).encode())
            elif self.path.startswith("/api/runs/moved"):
                self.answer(302, "text/plain", b"", Location="http://10.0.0.1/internal")
            else:
                self.answer(404, "application/json", json.dumps(
                    {"error": "\r\x1b[2Kalpha: all 7 entries chain and hash to the root\x1b[8m"}).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        keys = tmp_path / "keys"
        from smalti.trust.keys import write_key_pair

        write_key_pair("auditor", keys)
        lied = smalti_cli("auditor", "verify", base, "beta", "--key", str(keys / "auditor.key"), "--trainer-key",
                          str(governed.keys / "trainer.pub"))
        assert lied.returncode != 0 and "\x1b" not in lied.stderr and "\r" not in lied.stderr
        assert "\\x1b[2K" in lied.stderr  # shown, as an escape
        proof = smalti_cli("auditor", "proof", base, "alpha", "--step", "3", "--key", str(keys / "auditor.key"),
                           "--trainer-key", str(governed.keys / "trainer.pub"))
        assert proof.returncode != 0 and "\x1b" not in proof.stderr and "\r" not in proof.stderr, proof.stderr
        moved = smalti_cli("auditor", "audit", base, "moved", "--class", "x", "--key", str(keys / "auditor.key"))
        assert moved.returncode != 0 and "redirected (302)" in moved.stderr and "not followed" in moved.stderr
    finally:
        server.shutdown()


def test_refused_requests_are_aggregated_not_logged_one_by_one(service):
    base, runs, auditor, _, _ = service
    log = runs / ".smalti-access.sqlite"

    def rows() -> int:
        with sqlite3.connect(f"file:{log}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM access").fetchone()[0]

    before = rows()
    session = requests.Session()
    for _ in range(400):
        assert session.get(base + "/api/runs", timeout=30).status_code in (401, 429)
    client = Client(base, auditor)
    record = client.get("/api/access-log?last=200").json()  # writes the pending counts
    refused = [r for r in record["last"] if r.get("event") == "refused" and r["status"] == 401]
    assert refused and sum(r["count"] for r in refused) >= 400 and refused[-1]["client"] == "127.0.0.1"
    assert rows() - before < 10


def test_a_second_service_on_the_same_folder_refuses_and_the_first_keeps_answering(service, governed):
    base, runs, auditor, _, taxonomy = service
    port = free_port()
    second = smalti_cli("serve", str(runs), "--taxonomy", str(taxonomy), "--trust", str(governed.trust),
                        "--listen", f"127.0.0.1:{port}", timeout=60)
    assert second.returncode != 0 and len(second.stderr.strip().splitlines()) == 1
    assert "in use by pid" in second.stderr and "serving with access log" in second.stderr
    assert Client(base, auditor).get("/api/runs").status_code == 200


def test_half_sent_requests_time_out_and_one_client_cannot_hold_every_connection(service):
    base, _, auditor, _, _ = service
    port = int(base.rsplit(":", 1)[1])
    held = []
    try:
        for _ in range(300):  # more than one address may hold (256)
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            held.append(connection)
        time.sleep(0.5)
        refused = 0
        for connection in held[256:]:
            connection.settimeout(5)
            try:
                refused += connection.recv(200).startswith(b"HTTP/1.1 503")
            except OSError:
                pass
        assert refused >= 30
        time.sleep(2.5)  # the test server's --header-timeout is 2 s
        timed_out = 0
        for connection in held[:20]:
            connection.settimeout(5)
            try:
                timed_out += connection.recv(200).startswith(b"HTTP/1.1 408")
            except OSError:
                pass
        assert timed_out == 20
    finally:
        for connection in held:
            connection.close()
    assert Client(base, auditor).get("/api/runs").status_code == 200


def test_https_origin_sets_secure_cookies_and_binds_signatures_to_https(governed, tmp_path):
    """TLS served by the service itself, with a certificate the test makes; the client checks it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    runs = tmp_path / "runs"
    runs.mkdir()
    taxonomy = make_audit_taxonomy(governed, tmp_path)
    with serving(runs, taxonomy, governed.trust, "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key",
                 str(tmp_path / "key.pem"), scheme="https") as (base, _):
        from smalti.trust.keys import SigningKey
        from smalti.serve.client import AuditClient

        client = AuditClient(base, SigningKey.load(tmp_path / "keys" / "auditor.key"), tls_verify=str(tmp_path / "cert.pem"))
        assert client.json("/api/runs") == []
        answer = client.session.post(base + "/api/login", json={"code": client.sign_in_code()},
                                     verify=str(tmp_path / "cert.pem"))
        assert answer.status_code == 200
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith("__Host-smalti_session_") and "secure" in cookie.lower()
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(base + "/api/runs", timeout=10)  # an unchecked certificate is refused by the client


def test_the_auditor_command_line_checks_against_the_key_it_brings(service, governed):
    base, runs, auditor, _, _ = service
    trainer = str(governed.keys / "trainer.pub")
    listed = smalti_cli("auditor", "runs", base, "--key", str(auditor))
    assert listed.returncode == 0 and "alpha" in listed.stdout and "NOT TRUSTED" in listed.stdout
    verified = smalti_cli("auditor", "verify", base, "alpha", "--key", str(auditor), "--trainer-key", trainer)
    assert verified.returncode == 0 and "all 7 entries chain" in verified.stdout, verified.stderr
    wrong = smalti_cli("auditor", "verify", base, "resigned", "--key", str(auditor), "--trainer-key", trainer)
    assert wrong.returncode != 0 and "not signed by trainer key" in wrong.stderr
    proof = smalti_cli("auditor", "proof", base, "alpha", "--step", "4", "--key", str(auditor), "--trainer-key", trainer)
    assert proof.returncode == 0 and '"step": 4' in proof.stdout
    audit = smalti_cli("auditor", "audit", base, "alpha", "--class", "gutenberg/tragedy", "--key", str(auditor))
    assert audit.returncode == 0 and json.loads(audit.stdout)["class"] == "gutenberg/tragedy"
    sign_in = smalti_cli("auditor", "sign-in", base, "--key", str(auditor))
    assert sign_in.returncode == 0 and f"{base}/ui/#code=" in sign_in.stdout
    code = sign_in.stdout.strip().splitlines()[-1]
    assert requests.post(base + "/api/login", json={"code": code}, timeout=30).status_code == 200
    bad = smalti_cli("auditor", "runs", "not-a-url", "--key", str(auditor))
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1


def test_a_taxonomy_names_auditors_and_serve_refuses_one_without(governed, tmp_path):
    for auditors, name in (([], "none"), (["--auditor", f"external={governed.keys / 'comedy-tagger.pub'}"], "some")):
        out = tmp_path / f"{name}.yaml"
        made = smalti_cli("taxonomy", "init", str(out), "--name", name, "--class", "a/b", "--data-governance",
                          str(governed.trust), *auditors)
        assert made.returncode == 0, made.stderr
        assert smalti_cli("sign", str(out), "--key", str(governed.key("data-governance"))).returncode == 0
        (tmp_path / "runs").mkdir(exist_ok=True)
        if name == "none":
            refused = smalti_cli("serve", str(tmp_path / "runs"), "--taxonomy", str(out), "--trust", str(governed.trust))
            assert refused.returncode != 0 and "names no auditor key" in refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
        else:
            shown = smalti_cli("taxonomy", "show", str(out), "--trust", str(governed.trust))
            assert "external: auditor" in shown.stdout, shown.stdout
    bad = smalti_cli("taxonomy", "init", str(tmp_path / "bad.yaml"), "--name", "bad", "--class", "a/b", "--data-governance",
                     str(governed.trust), "--auditor", "nameonly")
    assert bad.returncode != 0 and "expected NAME=PUB" in bad.stderr


def test_one_key_in_two_roles_is_refused_unless_the_taxonomy_says_so(governed, tmp_path):
    from smalti.trust.keys import PublicKey
    from smalti.trust.taxonomy import Taxonomy, TaxonomyError, taxonomy_yaml

    shared = smalti_cli("taxonomy", "init", str(tmp_path / "t.yaml"), "--name", "t", "--class", "a/b",
                        "--data-governance", str(governed.trust), "--trainer", str(governed.keys / "trainer.pub"),
                        "--auditor", f"audit={governed.keys / 'trainer.pub'}")
    assert shared.returncode != 0 and "the same key" in shared.stderr and len(shared.stderr.strip().splitlines()) == 1
    key = PublicKey.load(governed.keys / "trainer.pub").text
    authorities = {"dg": {"role": "data-governance", "key": PublicKey.load(governed.trust).text},
                   "trainer": {"role": "trainer", "key": key}, "audit": {"role": "auditor", "key": key}}
    text = taxonomy_yaml("t", ["a/b"], authorities)
    with pytest.raises(TaxonomyError, match="'trainer' and 'audit' have the same key"):
        Taxonomy.parse(text.encode(), "t.yaml")
    allowed = Taxonomy.parse((text + "allow_shared_keys: true\n").encode(), "t.yaml")
    assert {a.role for a in allowed.authorities.values()} >= {"trainer", "auditor"}


def test_ledger_fields_of_the_wrong_type_are_refused_when_entries_are_decoded(governed, tmp_path):
    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.audit import AuditError, Ledger
    from smalti.trust.entry import EntryFormatError

    import shutil

    pristine = train(governed, tmp_path / "pristine", train={"max_duration": "3ba"})
    key = SigningKey.load(governed.key("trainer"))
    run = tmp_path / "run"

    def edited(edit) -> None:  # the trainer's own entries, one of them changed, chained and signed again
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(pristine, run)
        grow_ledger(run, 3, key, edit=lambda i, body: edit(body) if i == 2 else body)

    for field, value, message in (("loss", "<img src=x onerror=alert(1)>", "loss: expected a number"),
                                  ("step", "3", "step: expected an integer"),
                                  ("counts", {"a": "many"}, "counts"),
                                  ("dropped", ["<b>"], "dropped")):
        edited(lambda body: dict(body, **{field: value}))
        with pytest.raises((EntryFormatError, AuditError), match=message):
            Ledger.load(run, read_only=True)
    edited(lambda body: dict(body, contributions={"x": {"f32": "AACAPwAAgD8=", "shape": [1, 2]}}))
    assert Ledger.load(run).steps[1]["contributions"] == {"x": [[0, 1.0, 1.0]]}  # well-typed: read as written
    edited(lambda body: dict(body, layers={"f32": "A" * 32, "shape": [1, 6]}))
    with pytest.raises(AuditError, match="1 rows for"):
        Ledger.load(run)


@pytest.mark.slow
def test_200_concurrent_readers_while_a_run_trains_into_the_same_folder(tmp_path):
    """Bounded to 20 seconds here (the suite's time budget); `benchmarks/serve_load.py` holds 60."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from serve_load import make_environment, measure

    env = make_environment(tmp_path, steps=20)
    result = measure(env, [200], seconds=20, train_while=True, port=free_port(), kinds=("proof",))
    case = result["cases"][0]
    print(f"200 readers: {case['requests']} proofs, {case['rps']} per second, p50 {case['p50_ms']} ms, "
          f"p99 {case['p99_ms']} ms")
    assert result["errors"] == 0, case["first_errors"]  # every answer 200, every proof verified
    assert case["requests"] >= 200 and case["p99_ms"] > 0
    assert (env["runs"] / "beta" / "ledger.sqlite").is_file()  # the other run really was training meanwhile


def test_a_run_still_training_is_served_up_to_its_newest_signed_head(service, governed, tmp_path):
    from conftest import write_recipe
    from test_ledger import ledger_recipe

    base, runs, auditor, _, _ = service
    config = ledger_recipe(governed, train={"max_duration": "400ba"}, checkpoint={"interval": "2ba"})
    recipe = write_recipe(tmp_path / "r.yaml", config)
    training = subprocess.Popen([sys.executable, "-m", "smalti", "train", str(recipe), "--run-dir", str(runs / "gamma")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    client, seen = Client(base, auditor), []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (len(seen) < 2 or seen[-1] <= seen[0]):
            listed = {r["run"]: r for r in client.get("/api/runs").json()}
            if listed.get("gamma", {}).get("entries"):
                seen.append(listed["gamma"]["entries"])
                proof = client.get("/api/runs/gamma/proof/inclusion?step=1")
                assert proof.status_code == 200 and proof.json()["tree_head"]["final"] is False
            time.sleep(0.5)
    finally:
        training.terminate()
        training.wait(timeout=60)
    assert len(seen) >= 2 and seen[-1] > seen[0], seen  # new entries appear as the run signs new heads
    assert smalti_cli("ledger", "verify", str(runs / "gamma")).returncode != 0  # unfinished: verify says so


def test_report_links_are_one_use_and_logged_with_their_run(service):
    base, _, auditor, _, _ = service
    session = requests.Session()
    signed_in = session.post(base + "/api/login", json={"code": sign_in_code(base, auditor)}, timeout=30).json()
    session.headers["X-Smalti-Session"] = signed_in["session"]
    url = session.get(base + "/api/runs/alpha/report-ticket", timeout=30).json()["url"]
    assert requests.head(base + url, timeout=30).status_code == 405  # a HEAD does not use it up
    assert requests.get(base + url, timeout=30).status_code == 200
    assert requests.get(base + url, timeout=30).status_code == 404
    records = Client(base, auditor).get("/api/access-log?last=20").json()["last"]
    assert any(r.get("event") == "report" and r["query"] == "run=alpha" and url not in json.dumps(r) for r in records)


def test_one_address_cannot_take_every_sign_in_challenge(service):
    """Last in the module: it leaves this address's challenges taken for two minutes."""
    base, _, auditor, _, _ = service
    answers = [requests.get(base + "/api/login/challenge", timeout=30).status_code for _ in range(40)]
    assert answers[:20].count(200) >= 20 and 429 in answers
    assert requests.post(base + "/api/login", json={"code": "x.y.z"}, timeout=30).status_code == 401  # uses none
    for _ in range(620):  # refused sign-ins count toward the address's budget too
        requests.post(base + "/api/login", json={"code": "a.b.c"}, timeout=30)
    assert requests.post(base + "/api/login", json={"code": "a.b.c"}, timeout=30).status_code == 429


def test_public_tiles_are_immutable_for_caches_and_go_s_tlog_client_reads_the_log_through_the_service(
        service, governed, go_check, tmp_path):  # noqa: F811 (the fixture imported above)
    """--public-tiles: a run's checkpoint and tiles need no credential (a CDN in front may answer them), full
    tiles are marked immutable, partial ones never cached, and everything else still needs a credential.
    Without it, full tiles are immutable only in the auditor's own cache."""
    import shutil

    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey

    _, runs, auditor, _, taxonomy = service
    public = tmp_path / "runs"
    shutil.copytree(runs / "alpha", public / "long")
    size = grow_ledger(public / "long", 600, SigningKey.load(governed.key("trainer")))
    assert size > 512
    verifier = smalti_cli("ledger", "checkpoint", str(public / "long"), "--verifier-key").stdout.strip()
    full, partial = "/api/runs/long/tile/0/001", f"/api/runs/long/tile/0/002.p/{size - 512}"
    with serving(public, taxonomy, governed.trust, "--public-tiles") as (base, _):
        anyone = Client(base, None)
        for path in (full, "/api/runs/long/tile/entries/000", "/api/runs/long/tile/1/000.p/2"):
            answer = anyone.get(path)
            assert answer.status_code == 200, (path, answer.text)
        assert anyone.get(full).headers["cache-control"] == "public, max-age=31536000, immutable"
        assert anyone.get(partial).headers["cache-control"] == "no-store"
        assert anyone.get("/api/runs/long/checkpoint").headers["cache-control"] == "no-store"
        for closed in ("/api/runs", "/api/runs/long", "/api/runs/long/entries/1", "/api/runs/long/proof/inclusion?step=1"):
            assert anyone.get(closed).status_code == 401, closed
        assert anyone.get("/api/runs/long/tile/0/999").status_code == 404  # beyond the log: an error, not cached
        assert "immutable" not in anyone.get("/api/runs/long/tile/0/999").headers["cache-control"]
        checked = go(go_check, "tiles", f"{base}/api/runs/long", verifier)
        assert checked.returncode == 0, checked.stderr
        assert f"all {size} entries included" in checked.stdout
    with serving(public, taxonomy, governed.trust) as (base, _):
        assert Client(base, None).get(full).status_code == 401
        assert Client(base, auditor).get(full).headers["cache-control"] == "private, max-age=31536000, immutable"
