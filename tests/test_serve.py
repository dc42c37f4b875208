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


def test_the_ui_in_headless_chromium_logs_in_draws_and_verifies_in_the_browser(service, governed):
    import json
    import os
    import shutil

    from conftest import smalti_cli

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("SMALTI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (make test installs it) but is not on PATH")
        pytest.skip("no chromium on this machine (make test installs it)")
    from playwright.sync_api import sync_playwright

    base, runs, auditor = service
    info = Client(base, auditor).get("/api/runs/alpha").json()
    verifier = smalti_cli("ledger", "checkpoint", str(runs / "alpha"), "--verifier-key").stdout.strip()
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(base + "/ui/")
            page.fill("#key-pem", auditor.read_text())
            page.click("#login-button")
            page.wait_for_selector("tr.run-row", timeout=30_000)
            cookie = next(c for c in page.context.cookies() if c["name"] == "smalti_session")
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
            assert "signed in as auditor-one" in page.text_content("#who")
            page.click("tr.run-row[data-run=alpha]")
            page.wait_for_selector("#heatmap rect.cell")
            assert page.locator("#heatmap rect.cell").count() == len(info["layers"]) * len(info["classes"])
            page.fill("#verifier-key", verifier)
            page.fill("#inspect-step", "3")
            page.click("#verify")
            page.wait_for_function("!document.getElementById('verdict').textContent.startsWith('checking')")
            verdict = page.text_content("#verdict")
            assert verdict.startswith("verified in your browser"), verdict
            page.screenshot(path=str(artifacts / "serve-ui.png"), full_page=True)

            def flipped(route):  # the test's proxy: one byte of the served proof changed on its way
                response = route.fetch()
                proof = response.json()
                path = proof["audit_path"]
                path[0] = ("0" if path[0][0] != "0" else "1") + path[0][1:]
                route.fulfill(response=response, body=json.dumps(proof))

            page.route("**/proof/inclusion*", flipped)
            page.click("#verify")
            page.wait_for_function("!document.getElementById('verdict').textContent.startsWith('checking')")
            failed = page.text_content("#verdict")
            assert failed.startswith("failed") and "verified" not in failed, failed
            page.unroute("**/proof/inclusion*")
            page.fill("#verifier-key", verifier.replace("+", "-", 1).replace("-", "+", 1)[:-4] + "AAAA")
            page.click("#verify")
            page.wait_for_function("!document.getElementById('verdict').textContent.startsWith('checking')")
            assert page.text_content("#verdict").startswith("failed")
        finally:
            browser.close()


@pytest.mark.slow
def test_200_concurrent_readers_while_a_run_trains_into_the_same_folder(tmp_path):
    """Bounded to 20 seconds here (the suite's time budget); `benchmarks/serve_load.py` holds 60."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from conftest import free_port
    from serve_load import make_environment, measure

    env = make_environment(tmp_path, steps=20)
    result = measure(env, [200], seconds=20, train_while=True, port=free_port(), kinds=("proof",))
    case = result["cases"][0]
    print(f"200 readers: {case['requests']} proofs, {case['rps']} per second, p50 {case['p50_ms']} ms, "
          f"p99 {case['p99_ms']} ms")
    assert result["errors"] == 0, case["first_errors"]  # every answer 200, every proof verified
    assert case["requests"] >= 200 and case["p99_ms"] > 0
    assert (env["runs"] / "beta" / "ledger.sqlite").is_file()  # the other run really was training meanwhile


def test_a_taxonomy_names_auditors_and_serve_refuses_one_without(governed, tmp_path):
    from conftest import smalti_cli

    for auditors, name in (([], "none"), (["--auditor", f"external={governed.keys / 'model-risk.pub'}"], "some")):
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


def test_a_run_still_training_is_served_up_to_its_newest_signed_head(service, governed, tmp_path):
    import time

    from conftest import smalti_cli, write_recipe
    from test_ledger import ledger_recipe

    base, runs, auditor = service
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
