"""What the service tests share: a taxonomy naming an auditor, `smalti serve` started for real on loopback, and
a client that signs requests with the http-message-signatures library (a third party's RFC 9421 code, as any
auditor's client would), with every part of the request under the test's control."""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
import requests

from conftest import REPO, free_port, wait_for_port


def make_audit_taxonomy(governed, root: Path, evaluators: dict[str, Path] | None = None) -> Path:
    """The governed taxonomy's classes, with data governance, the trainer and one auditor (root/keys/auditor);
    ``evaluators``: name -> public key file of each evaluator to name too."""
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.trust.taxonomy import Taxonomy, taxonomy_yaml

    keys = root / "keys"
    for name in ("auditor", "outsider"):
        if not (keys / f"{name}.key").exists():
            write_key_pair(name, keys)
    original = Taxonomy.load(governed.taxonomy, PublicKey.load(governed.trust))
    pub = lambda path: PublicKey.load(path).text  # noqa: E731
    authorities = {"data-governance": {"role": "data-governance", "key": pub(governed.trust)},
                   "trainer": {"role": "trainer", "key": pub(governed.keys / "trainer.pub")},
                   "model-risk": {"role": "model-risk", "key": pub(governed.keys / "model-risk.pub")},
                   "auditor-one": {"role": "auditor", "key": pub(keys / "auditor.pub")}}
    for name, public in (evaluators or {}).items():
        authorities[name] = {"role": "evaluator", "key": pub(public)}
    taxonomy = root / "audit-taxonomy.yaml"
    taxonomy.write_text(taxonomy_yaml("audit", original.classes, authorities))
    (root / "audit-taxonomy.yaml.sig").write_text(
        sign_bytes(taxonomy.read_bytes(), SigningKey.load(governed.key("data-governance"))).to_json())
    return taxonomy


@contextlib.contextmanager
def serving(runs: Path, taxonomy: Path, trust: Path, *extra: str, port: int | None = None,
            scheme: str = "http") -> Iterator[tuple[str, subprocess.Popen]]:
    """`smalti serve` in its own process for the block: (base URL, process)."""
    port = port or free_port()
    process = subprocess.Popen([sys.executable, "-m", "smalti", "serve", str(runs), "--taxonomy", str(taxonomy),
                                "--trust", str(trust), "--listen", f"127.0.0.1:{port}", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        wait_for_port(port, process)
        yield f"{scheme}://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
            raise


def key_id(public_path: Path) -> str:
    line = [x for x in public_path.read_text().splitlines() if x.startswith("ed25519:")][0]
    return hashlib.sha256(base64.b64decode(line[len("ed25519:"):])).hexdigest()[:16]


def _signer(key_path: Path):
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from http_message_signatures import HTTPMessageSigner, HTTPSignatureKeyResolver, algorithms

    private = load_pem_private_key(key_path.read_bytes(), None)

    class Keys(HTTPSignatureKeyResolver):
        def resolve_private_key(self, key_id: str):
            return private

    return HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=Keys())


class Client:
    """An auditor's HTTP client: every request signed with @method and @target-uri, a nonce and a fresh time.
    ``signed_for`` signs for another origin than the one the request is sent to (what a relaying service would
    try)."""

    def __init__(self, base: str, key: Path | None, signed_for: str | None = None) -> None:
        self.base, self.key, self.signed_for = base, key, signed_for
        self.session = requests.Session()

    def request(self, method: str, path: str, nonce: str | None = None, created: datetime.datetime | None = None,
                headers: dict | None = None) -> tuple[requests.PreparedRequest, requests.Response]:
        prepared = requests.Request(method, (self.signed_for or self.base) + path, headers=headers or {}).prepare()
        if self.key is not None:
            _signer(self.key).sign(prepared, key_id=key_id(self.key.with_suffix(".pub")),
                                   covered_component_ids=("@method", "@target-uri"), tag="smalti-audit",
                                   nonce=nonce or uuid.uuid4().hex,
                                   created=created or datetime.datetime.now(datetime.timezone.utc))
        if self.signed_for:  # sent here, but signed (and Host-headed) for the other service
            prepared.url = self.base + path
            prepared.headers["Host"] = self.signed_for.split("//", 1)[1]
        return prepared, self.session.send(prepared, timeout=60)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)[1]


def sign_in_code(base: str, key_path: Path, origin: str | None = None) -> str:
    """A code as `smalti auditor sign-in` makes it; ``origin`` signs it for another service instead."""
    from smalti.trust.keys import SigningKey
    from smalti.serve.auth import login_message

    key = SigningKey.load(key_path)
    challenge = requests.get(base + "/api/login/challenge", timeout=30).json()["challenge"]
    signature = base64.urlsafe_b64encode(key.sign(login_message(origin or base, challenge))).decode().rstrip("=")
    return f"{challenge}.{key.public.key_id}.{signature}"


def chromium_path() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("SMALTI_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (make test installs it) but is not on PATH")
        pytest.skip("no chromium on this machine (make test installs it)")
    return chromium


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
