"""`smalti serve` (issue 23, part 1): a real server on loopback, real signed requests (RFC 9421, signed by the
http-message-signatures library as any client would), every auth case, bad input, and a run left byte for byte
as it was."""

from __future__ import annotations

import base64
import datetime
import hashlib
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import requests

from conftest import REPO, free_port, wait_for_port
from test_ledger import train


def _signer(key_path: Path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

    private = load_pem_private_key(key_path.read_bytes(), None)

    class Keys(HTTPSignatureKeyResolver):
        def resolve_private_key(self, key_id: str):
            return private

    return HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=Keys())


def key_id(public_path: Path) -> str:
    line = [x for x in public_path.read_text().splitlines() if x.startswith("ed25519:")][0]
    return hashlib.sha256(base64.b64decode(line[len("ed25519:"):])).hexdigest()[:16]


class Client:
    """An auditor's HTTP client: every request signed with @method and @target-uri, a nonce and a fresh time."""

    def __init__(self, base: str, key: Path | None) -> None:
        self.base, self.key = base, key
        self.session = requests.Session()

    def request(self, method: str, path: str, nonce: str | None = None, created: datetime.datetime | None = None,
                headers: dict | None = None) -> tuple[requests.PreparedRequest, requests.Response]:
        prepared = requests.Request(method, self.base + path, headers=headers or {}).prepare()
        if self.key is not None:
            _signer(self.key).sign(prepared, key_id=key_id(self.key.with_suffix(".pub")),
                                   covered_component_ids=("@method", "@target-uri"), tag="smalti-audit",
                                   nonce=nonce or uuid.uuid4().hex,
                                   created=created or datetime.datetime.now(datetime.timezone.utc))
        return prepared, self.session.send(prepared, timeout=60)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)[1]


@pytest.fixture(scope="module")
def service(governed, tmp_path_factory):
    """Runs, a taxonomy naming an auditor, and `smalti serve` on loopback; stopped after the module."""
    from smalti.governance.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.governance.taxonomy import Taxonomy, taxonomy_yaml

    root = tmp_path_factory.mktemp("serve")
    runs = root / "runs"
    train(governed, runs / "alpha", train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"})
    write_key_pair("auditor", root / "keys")
    original = Taxonomy.load(governed.taxonomy, PublicKey.load(governed.trust))
    pub = lambda path: PublicKey.load(path).text  # noqa: E731
    authorities = {"data-governance": {"role": "data-governance", "key": pub(governed.trust)},
                   "trainer": {"role": "trainer", "key": pub(governed.keys / "trainer.pub")},
                   "auditor-one": {"role": "auditor", "key": pub(root / "keys" / "auditor.pub")}}
    taxonomy = root / "audit-taxonomy.yaml"
    taxonomy.write_text(taxonomy_yaml("audit", original.classes, authorities))
    (root / "audit-taxonomy.yaml.sig").write_text(
        sign_bytes(taxonomy.read_bytes(), SigningKey.load(governed.key("data-governance"))).to_json())
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "smalti", "serve", str(runs), "--taxonomy", str(taxonomy),
                                "--trust", str(governed.trust), "--listen", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    wait_for_port(port, process)
    yield f"http://127.0.0.1:{port}", runs, root / "keys" / "auditor.key"
    process.terminate()
    process.wait(timeout=10)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(("-shm", "-wal"))}


def test_every_credential_case_gets_its_status(service, governed):
    base, runs, auditor = service
    assert Client(base, None).get("/api/runs").status_code == 401
    ok = Client(base, auditor).get("/api/runs")
    assert ok.status_code == 200 and ok.json()[0]["run"] == "alpha" and ok.json()[0]["final"] is True
    trainer = Client(base, governed.key("trainer")).get("/api/runs")  # a valid key, not an auditor's
    assert trainer.status_code == 403 and "not an auditor" in trainer.json()["error"]
    from smalti.governance.keys import write_key_pair

    stranger_dir = Path(runs.parent / "stranger")
    if not (stranger_dir / "nobody.key").exists():
        write_key_pair("nobody", stranger_dir)
    assert Client(base, stranger_dir / "nobody.key").get("/api/runs").status_code == 401  # a key nobody named

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
    assert bad.status_code == 401 and bad.json()["error"].startswith("signature refused")
    huge = client.get("/api/runs", headers={"X-Padding": "x" * 40_000})
    assert huge.status_code in (400, 431)
    assert client.get("/openapi.json").json()["info"]["title"] == "Smalti audit service"


def test_proofs_and_queries_hold_and_bad_input_is_a_json_error(service):
    from smalti.governance.ledger import merkle

    base, runs, auditor = service
    client = Client(base, auditor)
    info = client.get("/api/runs/alpha").json()
    assert info["head"]["final"] and len(info["layers"]) > 0
    proof = client.get("/api/runs/alpha/proof/inclusion?step=3").json()
    leaf = merkle.leaf_hash(base64.b64decode(proof["entry_base64"]))
    assert merkle.verify_inclusion(proof["leaf_index"], proof["tree_size"], leaf,
                                   [bytes.fromhex(p) for p in proof["audit_path"]], bytes.fromhex(proof["tree_head"]["root"]))
    consistency = client.get(f"/api/runs/alpha/proof/consistency?first=3&second={proof['tree_size']}").json()
    assert merkle.verify_consistency(3, proof["tree_size"], [bytes.fromhex(p) for p in consistency["proof"]],
                                     bytes.fromhex(consistency["first_root"]), bytes.fromhex(consistency["second_root"]))
    checkpoint = client.get("/api/runs/alpha/checkpoint").text
    assert checkpoint.splitlines()[1] == str(proof["tree_size"])
    assert len(client.get("/api/runs/alpha/tile/0/000.p/" + str(proof["tree_size"])).content) == 32 * proof["tree_size"]
    layer = info["layers"][0]
    assert client.get(f"/api/runs/alpha/audit/layer?name={layer}").json()["layer"] == layer
    assert "layers_touched" in client.get(f"/api/runs/alpha/audit/class?name={info['classes'][0]}").json()
    assert client.get("/api/runs/alpha/report").text.startswith("<!DOCTYPE html>")
    for path, status, fragment in (
            ("/api/runs/alpha/proof/inclusion?step=999", 400, "no entry under the latest signed head"),
            ("/api/runs/alpha/entries/99999", 400, "out of range"),
            ("/api/runs/alpha/audit/class?name=gutenberg/nothing", 400, "no class or node"),
            ("/api/runs/alpha/proof/inclusion?step=abc", 400, "step"),
            ("/api/runs/../alpha", 404, ""),
            ("/api/runs/%2e%2e/%2e%2e/etc/passwd", 404, ""),
            ("/api/runs/..%2f..%2fetc%2fpasswd/checkpoint", 404, ""),
            ("/api/runs/nosuchrun", 404, "no run named"),
            ("/api/runs/alpha/certificate", 404, "no deletion certificate")):
        answer = client.get(path)
        assert answer.status_code == status, (path, answer.status_code, answer.text[:200])
        assert answer.headers["content-type"].startswith("application/json"), path
        assert fragment in answer.json()["error"] and "Traceback" not in answer.text, path
    log = client.get("/api/access-log?last=1000").json()
    assert log["size"] >= 10 and any(r["status"] == 404 for r in log["last"])
    assert all(r["reader"] in ("auditor-one", None) for r in log["last"])


def test_a_session_of_requests_leaves_every_run_byte_for_byte(service):
    base, runs, auditor = service
    before = _bytes(runs / "alpha")
    client = Client(base, auditor)
    for path in ("/api/runs", "/api/runs/alpha", "/api/runs/alpha/checkpoint", "/api/runs/alpha/entries/1",
                 "/api/runs/alpha/proof/inclusion?step=2", "/api/runs/alpha/audit/layer?name=tok_emb",
                 "/api/runs/alpha/entropy", "/api/runs/alpha/contributions", "/api/runs/alpha/report"):
        client.get(path)
    assert _bytes(runs / "alpha") == before
