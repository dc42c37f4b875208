"""Signed models (issue 22): `smalti export --sign` checked by the OpenSSF model_signing CLI, the in-toto
project's DSSE code and the in-toto attestation schemas, not only by `smalti verify-model`."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, smalti_cli, write_recipe
from test_hf_models import hf_model
from test_ledger import ledger_recipe
from test_pkcs11 import token  # noqa: F401 (a SoftHSM2 token)


@pytest.fixture(scope="module")
def signed(governed, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("signed")
    config = ledger_recipe(governed, model=hf_model("llama"), train={"max_duration": "4ba"})
    assert smalti_cli("train", str(write_recipe(root / "r.yaml", config)), "--run-dir", str(root / "run")).returncode == 0
    made = smalti_cli("keys", "new", "trainer-model", "--dir", str(root / "keys"), "--type", "ecdsa-p256")
    assert made.returncode == 0, made.stderr
    done = smalti_cli("export", str(root / "run"), "--out", str(root / "model"), "--sign",
                      "--model-key", str(root / "keys" / "trainer-model.key"))
    assert done.returncode == 0, done.stderr
    return root / "run", root / "model", root / "keys" / "trainer-model.pub"


def model_signing_verify(model: Path, public: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", str(model), "--signature",
                           str(model / "model.sig"), "--public_key", str(public)], capture_output=True, text=True,
                          cwd=REPO)


def test_the_openssf_model_signing_cli_and_in_toto_check_the_exported_model(signed, governed):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from google.protobuf import json_format
    from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey
    from transformers import AutoModelForCausalLM

    run, model, model_pub = signed
    checked = model_signing_verify(model, model_pub)
    assert checked.returncode == 0 and "Verification succeeded" in checked.stdout, checked.stderr

    # The DSSE envelope, checked with the trainer's public key read straight from its file.
    raw = base64.b64decode((governed.keys / "trainer.pub").read_text().split("ed25519:")[1].strip())
    key_id = hashlib.sha256(raw).hexdigest()[:16]  # the key id Smalti prints (docs/ledger.md), the envelope's
    key = SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(raw), keyid=key_id)
    envelope = Envelope.from_dict(json.loads((model / "provenance.intoto.json").read_text()))
    envelope.verify([key], 1)
    assert envelope.payload_type == "application/vnd.in-toto+json"
    statement = json.loads(envelope.payload)
    parsed = json_format.ParseDict({k: v for k, v in statement.items() if k != "_type"} | {"type": statement["_type"]},
                                   Statement([], "", {}).pb)
    Statement.copy_from_pb(parsed).validate()
    json_format.ParseDict(statement["predicate"], provenance_pb2.Provenance())  # the SLSA v1 schema, strictly
    names = {s["name"] for s in statement["subject"]}
    assert "config.json" in names and "model.safetensors" in names and "model.sig" not in names
    predicate = statement["predicate"]
    assert predicate["buildDefinition"]["externalParameters"]["recipe"]["model"]["name"] == "hf"
    assert any(d["uri"].startswith("file://") and d["digest"]["sha256"] for d in
               predicate["buildDefinition"]["resolvedDependencies"])  # the dataset, by its signed manifest
    checkpoint = next(p for p in predicate["runDetails"]["byproducts"] if p["name"] == "ledger checkpoint")
    note = base64.b64decode(checkpoint["content"]).decode()
    assert note == smalti_cli("ledger", "checkpoint", str(run)).stdout  # the run's final signed head

    ours = smalti_cli("verify-model", str(model), "--trainer-pubkey", str(governed.keys / "trainer.pub"),
                      "--model-pubkey", str(model_pub))
    assert ours.returncode == 0, ours.stderr
    assert "model signature OK" in ours.stdout and "provenance OK" in ours.stdout and "ledger checkpoint OK" in ours.stdout
    assert AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True) is not None  # still a model folder


def test_verify_model_takes_the_folder_however_it_is_named(signed, governed):
    """A relative path made model_signing see model.sig as an extra file (it compares absolute paths)."""
    import subprocess
    import sys

    run, _, model_pub = signed
    root = run.parent
    exported = subprocess.run([sys.executable, "-m", "smalti", "export", "run", "--out", "export/relative", "--sign",
                               "--model-key", "keys/trainer-model.key"], cwd=root, capture_output=True, text=True,
                              timeout=300)  # exported as a user would, with relative paths
    assert exported.returncode == 0, exported.stderr
    model = root / "export" / "relative"
    keys = ["--trainer-pubkey", str(governed.keys / "trainer.pub"), "--model-pubkey", str(model_pub)]
    for cwd, folder in ((root, "export/relative"), (REPO, str(model)), (model.parent, model.name + "/"),
                        (model, ".")):
        done = subprocess.run([sys.executable, "-m", "smalti", "verify-model", folder, *keys], cwd=cwd,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (folder, done.stderr)
        assert f"every file of {folder.rstrip('/')}" in done.stdout


def test_a_changed_file_or_a_foreign_key_fails_every_checker(signed, governed, tmp_path):
    import shutil

    run, model, model_pub = signed
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_signing_verify(copy, model_pub).returncode != 0
    ours = smalti_cli("verify-model", str(copy), "--trainer-pubkey", str(governed.keys / "trainer.pub"),
                      "--model-pubkey", str(model_pub))
    assert ours.returncode != 0 and "model signature does not verify" in ours.stderr
    assert len(ours.stderr.strip().splitlines()) == 1

    stranger = smalti_cli("verify-model", str(model), "--trainer-pubkey", str(governed.keys / "model-risk.pub"),
                          "--model-pubkey", str(model_pub))
    assert stranger.returncode != 0 and "not signed by trainer key" in stranger.stderr

    refused = smalti_cli("export", str(run), "--out", str(tmp_path / "unsigned"), "--sign",
                         "--model-key", str(governed.key("trainer")))  # an Ed25519 key: model_signing refuses it
    assert refused.returncode != 0 and "ecdsa-p256" in refused.stderr and not (tmp_path / "unsigned").exists()
    wrong = smalti_cli("export", str(run), "--out", str(tmp_path / "wrong"), "--sign", "--trainer-key",
                       str(governed.key("model-risk")), "--model-key", str(model_pub.with_suffix(".key")))
    assert wrong.returncode != 0 and "is not the key that signed" in wrong.stderr and not (tmp_path / "wrong").exists()


def test_the_model_signing_key_can_live_in_a_pkcs11_token(signed, governed, token, tmp_path):  # noqa: F811
    run, _, _ = signed
    uri = "pkcs11:token=smalti;object=model-signing"
    made = smalti_cli("keys", "new", "model-signing", "--dir", str(token), "--in", uri, "--type", "ecdsa-p256")
    assert made.returncode == 0, made.stderr
    assert (token / "model-signing.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    done = smalti_cli("export", str(run), "--out", str(tmp_path / "model"), "--sign", "--model-key", uri)
    assert done.returncode == 0, done.stderr
    checked = model_signing_verify(tmp_path / "model", token / "model-signing.pub")  # OpenSSF's CLI, the PEM alone
    assert checked.returncode == 0 and "Verification succeeded" in checked.stdout, checked.stderr
    ours = smalti_cli("verify-model", str(tmp_path / "model"), "--trainer-pubkey", str(governed.keys / "trainer.pub"),
                      "--model-pubkey", str(token / "model-signing.pub"))
    assert ours.returncode == 0, ours.stderr


def test_an_ablated_class_s_adapter_is_left_out_of_the_export_and_the_provenance_says_so(governed, tmp_path):
    """A folder named after a deleted class (its adapter reset, lora_B zero) used to ship in the export."""
    from conftest import write_policy
    from securesystemslib.dsse import Envelope
    from test_hf_models import HAMLET, MACBETH

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = ledger_recipe(governed, model=hf_model("llama", classes=[HAMLET, MACBETH], freeze_base=False),
                           governance={"policy": str(policy)}, train={"max_duration": "4ba", "microbatch_size": 2},
                           data={"batching": "per_class"})
    run = tmp_path / "run"
    assert smalti_cli("train", str(write_recipe(tmp_path / "r.yaml", config)), "--run-dir", str(run)).returncode == 0
    forgot = smalti_cli("forget", str(run), "--class", HAMLET, "--mode", "ablate", "--out", str(tmp_path / "forgot"),
                        "--eval-samples", "16")
    assert forgot.returncode == 0, forgot.stderr
    assert smalti_cli("keys", "new", "model", "--dir", str(tmp_path / "keys"), "--type", "ecdsa-p256").returncode == 0
    done = smalti_cli("export", str(tmp_path / "forgot"), "--out", str(tmp_path / "model"), "--sign",
                      "--model-key", str(tmp_path / "keys" / "model.key"))
    assert done.returncode == 0, done.stderr
    assert f"left out the adapter of {HAMLET}" in done.stdout
    adapters = {p.name for p in (tmp_path / "model" / "adapters").iterdir()}
    assert adapters and not any("hamlet" in name for name in adapters) and any("macbeth" in name for name in adapters)
    envelope = Envelope.from_dict(json.loads((tmp_path / "model" / "provenance.intoto.json").read_text()))
    left_out = json.loads(envelope.payload)["predicate"]["buildDefinition"]["internalParameters"]["adapters_left_out"]
    assert left_out["classes"] == [HAMLET]
    verified = smalti_cli("verify-model", str(tmp_path / "model"), "--trainer-pubkey", str(governed.keys / "trainer.pub"),
                          "--model-pubkey", str(tmp_path / "keys" / "model.pub"))
    assert verified.returncode == 0, verified.stderr
