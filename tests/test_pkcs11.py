"""Signing keys in a PKCS#11 token (issue 22), with SoftHSM2 as the real token: the key is made in the token,
never leaves it, and signs files, ledger heads and witness cosignatures that verify with the public key alone.

`make test` installs SoftHSM2 with apt-get (the `softhsm` target); without it these tests fail rather than skip."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import smalti_cli, tiny_recipe, write_recipe

URI = "pkcs11:token=smalti;object=trainer"


@pytest.fixture
def token(tmp_path, monkeypatch) -> Path:
    """A fresh SoftHSM2 token labelled 'smalti' (user PIN 1234) in a folder of this test's own."""
    if shutil.which("softhsm2-util") is None:
        pytest.fail("SoftHSM2 is needed (make softhsm: apt-get install softhsm2)")
    (tmp_path / "tokens").mkdir()
    config = tmp_path / "softhsm2.conf"
    config.write_text(f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    monkeypatch.setenv("SOFTHSM2_CONF", str(config))
    monkeypatch.setenv("SMALTI_PKCS11_PIN", "1234")
    made = subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "smalti", "--pin", "1234",
                           "--so-pin", "5678"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    keys = tmp_path / "keys"
    done = smalti_cli("keys", "new", "trainer", "--dir", str(keys), "--in", URI)
    assert done.returncode == 0, done.stderr
    return keys


def _raw(public_file: Path) -> bytes:
    line = [line for line in public_file.read_text().splitlines() if line.startswith("ed25519:")][0]
    return base64.b64decode(line[len("ed25519:"):])


def test_a_key_made_in_the_token_signs_files_that_verify_with_the_public_key_alone(token, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    again = smalti_cli("keys", "new", "trainer", "--dir", str(tmp_path / "other"), "--in", URI)
    assert again.returncode != 0 and "already holds a key labelled 'trainer'" in again.stderr
    document = tmp_path / "policy.yaml"
    document.write_text("policy: p\n")
    signed = smalti_cli("sign", str(document), "--key", URI)
    assert signed.returncode == 0, signed.stderr
    verified = smalti_cli("verify", str(document), "--pubkey", str(token / "trainer.pub"))
    assert verified.returncode == 0, verified.stderr
    import json

    signature = base64.b64decode(json.loads((tmp_path / "policy.yaml.sig").read_text())["signature"])
    Ed25519PublicKey.from_public_bytes(_raw(token / "trainer.pub")).verify(signature, document.read_bytes())

    for uri, fragment in ((URI.replace("object=trainer", "object=nobody"), "no Ed25519 key pair labelled 'nobody'"),
                          (URI.replace("token=smalti", "token=elsewhere"), "no PKCS#11 token labelled 'elsewhere'"),
                          (URI + "?pin-value=0000", "PIN for token 'smalti' is wrong"),
                          ("pkcs11:token=smalti", "needs object")):
        refused = smalti_cli("sign", str(document), "--key", uri)
        assert refused.returncode != 0 and fragment in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_a_ledger_signed_in_the_token_verifies_and_a_witness_cosigns_with_a_token_key(token, tiny_corpus, tmp_path):
    config = tiny_recipe(tiny_corpus, governance={"ledger": {"enabled": True, "key": URI}},
                         train={"max_duration": "4ba"}, checkpoint={"interval": "2ba"})
    done = smalti_cli("train", str(write_recipe(tmp_path / "r.yaml", config)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    verified = smalti_cli("ledger", "verify", str(tmp_path / "run"), "--pubkey", str(token / "trainer.pub"))
    assert verified.returncode == 0 and "ledger OK" in verified.stdout, verified.stderr

    # The auditor's witness key in the same token: cosign the published log, then require the cosignature.
    made = smalti_cli("keys", "new", "auditor", "--dir", str(token), "--in", "pkcs11:token=smalti;object=auditor")
    assert made.returncode == 0, made.stderr
    log = tmp_path / "log"
    assert smalti_cli("ledger", "publish", str(tmp_path / "run"), "--to", str(log)).returncode == 0
    log_key = smalti_cli("ledger", "checkpoint", str(tmp_path / "run"), "--verifier-key").stdout.strip()
    cosigned = smalti_cli("witness", "cosign", str(log), "--key", "pkcs11:token=smalti;object=auditor",
                          "--state", str(tmp_path / "state"), "--log-key", log_key)
    assert cosigned.returncode == 0, cosigned.stderr
    witnessed = smalti_cli("ledger", "verify", str(tmp_path / "run"), "--witness", str(token / "auditor.pub"),
                           "--cosigned", str(log))
    assert witnessed.returncode == 0 and "witness OK" in witnessed.stdout, witnessed.stderr
