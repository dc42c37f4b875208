"""``smalti admit``: a deployer checks a signed model's record, then its deploy policy (CEL), and signs a SLSA VSA.

The chain is real: a Llama trained under the ledger, evaluated by an evaluator the taxonomy names, exported and
signed. Each requirement, broken on its own, fails admission with its own line; the VSA parses with the in-toto
attestation library's VSA schema and verifies with securesystemslib given the deployer's public key alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import yaml

from conftest import smalti_cli, tiny_recipe, write_recipe
from test_hf_models import hf_model

pytest.importorskip("celpy")


@pytest.fixture(scope="module")
def exported(evaluated_governance, tmp_path_factory):
    g = evaluated_governance
    root = tmp_path_factory.mktemp("admit")
    data = {"corpus": None, "url": str(g.dataset), "taxonomy": str(g.taxonomy), "trust": str(g.trust),
            "cache_dir": str(root / "cache")}
    config = tiny_recipe(Path("unused"), model=hf_model(), data=data, train={"max_duration": "4ba"},
                         eval={"interval": "4ba"}, checkpoint={"interval": "4ba"},
                         governance={"ledger": {"enabled": True, "key": str(g.key("trainer"))}})
    run = root / "run"
    assert smalti_cli("train", str(write_recipe(root / "r.yaml", config)), "--run-dir", str(run)).returncode == 0
    assert smalti_cli("evaluate", str(run), "--key", str(g.key("evaluator")), "--no-tasks").returncode == 0
    for name, kind in (("trainer-model", "ecdsa-p256"), ("deployer", "ed25519")):
        assert smalti_cli("keys", "new", name, "--dir", str(root / "keys"), "--type", kind).returncode == 0
    model = root / "model"
    done = smalti_cli("export", str(run), "--out", str(model), "--sign", "--model-key",
                      str(root / "keys" / "trainer-model.key"))
    assert done.returncode == 0, done.stderr
    return root, model


REQUIREMENTS = {
    "evaluated by lab-evals": 'model.evaluations.exists(e, e.evaluator == "lab-evals" && size(e.held_out) > 0)',
    "hamlet's held-out loss under 10": 'model.evaluations.all(e, e.held_out["gutenberg/tragedy/hamlet"] < 10.0)',
    "trained on the governed classes": '"gutenberg/tragedy/hamlet" in model.classes',
    "a finished ledger": "model.ledger.final",
    "no evaluation refused": "size(model.refused) == 0",
}


def admit(root: Path, model: Path, g, requirements: dict[str, str], *extra: str):
    policy = root / f"policy-{abs(hash(tuple(requirements.items())))}.yaml"
    policy.write_text(yaml.safe_dump({"admit": "deploy-v1", "requirements": [
        {"name": n, "expr": e} for n, e in requirements.items()]}))
    return smalti_cli("admit", str(model), "--policy", str(policy), "--trainer-pubkey", str(g.keys / "trainer.pub"),
                      "--model-pubkey", str(root / "keys" / "trainer-model.pub"), *extra), policy


def test_a_model_whose_record_meets_the_policy_is_admitted_with_a_signed_vsa(exported, evaluated_governance):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from google.protobuf import json_format
    from in_toto_attestation.predicates.vsa.v1 import vsa_pb2
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    g, (root, model) = evaluated_governance, exported
    vsa = root / "model.vsa.intoto.json"
    done, policy = admit(root, model, g, REQUIREMENTS, "--evaluator", f"lab-evals={g.keys / 'evaluator.pub'}",
                         "--key", str(root / "keys" / "deployer.key"), "--out", str(vsa))
    assert done.returncode == 0, done.stderr
    assert "admitted under deploy-v1 (5 requirements hold)" in done.stdout
    raw = base64.b64decode((root / "keys" / "deployer.pub").read_text().split("ed25519:")[1].strip())
    key = SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(raw), keyid=hashlib.sha256(raw).hexdigest()[:16])
    envelope = Envelope.from_dict(json.loads(vsa.read_text()))
    envelope.verify([key], 1)
    statement = json.loads(envelope.payload)
    parsed = json_format.ParseDict({k: v for k, v in statement.items() if k != "_type"} | {"type": statement["_type"]},
                                   Statement([], "", {}).pb)
    Statement.copy_from_pb(parsed).validate()
    predicate = statement["predicate"]
    # the VSA v1 schema, strictly; the library's proto has verifiedLevels as one string where the spec (and Smalti)
    # has an array of them, so that field is checked against the spec's text instead
    json_format.ParseDict({k: v for k, v in predicate.items() if k != "verifiedLevels"}, vsa_pb2.VerificationSummary())
    assert predicate["verifiedLevels"] == ["SMALTI_ADMIT_DEPLOY_V1"]
    assert statement["predicateType"] == "https://slsa.dev/verification_summary/v1"
    assert predicate["verificationResult"] == "PASSED"
    assert predicate["policy"]["digest"]["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()
    checked = {i["uri"] for i in predicate["inputAttestations"]}
    assert "provenance.intoto.json" in checked and "evaluations/lab-evals-ep0-ba4.intoto.json" in checked
    assert {s["name"] for s in statement["subject"]} >= {"model.safetensors", "config.json"}


@pytest.mark.parametrize("broken,line", [
    ({"policy fingerprint allowed": 'model.fingerprints.policy in ["0" ]'}, "'policy fingerprint allowed' failed"),
    ({"tempest deleted": '"gutenberg/comedy/tempest" in model.deleted_classes'}, "'tempest deleted' failed"),
    ({"evaluated on a task": 'model.evaluations.exists(e, e.tasks["shakespeare_which_play"]["acc"] >= 0.6)'},
     "'evaluated on a task' failed"),
])
def test_each_requirement_broken_alone_fails_with_its_own_line(exported, evaluated_governance, broken, line):
    g, (root, model) = evaluated_governance, exported
    done, _ = admit(root, model, g, {**REQUIREMENTS, **broken}, "--evaluator",
                    f"lab-evals={g.keys / 'evaluator.pub'}")
    assert done.returncode == 1
    failures = [x for x in done.stderr.splitlines() if "failed" in x and x.startswith("smalti: admit: requirement")]
    assert len(failures) == 1 and line in failures[0], done.stderr
    assert "NOT ADMITTED under deploy-v1: 1 of 6 requirements failed" in done.stderr


def test_an_evaluation_signed_by_a_key_the_deployer_does_not_trust_does_not_count(exported, evaluated_governance):
    g, (root, model) = evaluated_governance, exported
    done, _ = admit(root, model, g, REQUIREMENTS, "--evaluator", f"lab-evals={g.keys / 'model-risk.pub'}")
    assert done.returncode == 1
    assert "'evaluated by lab-evals' failed" in done.stderr and "'no evaluation refused' failed" in done.stderr
    assert "not counted: evaluations/lab-evals-ep0-ba4.intoto.json: not signed by any evaluator" in done.stderr


def test_a_changed_file_or_a_foreign_trainer_fails_before_any_requirement(exported, evaluated_governance, tmp_path):
    import shutil

    g, (root, model) = evaluated_governance, exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    done, _ = admit(root, copy, g, REQUIREMENTS)
    assert done.returncode != 0 and "the model signature does not verify" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    _, policy = admit(root, model, g, REQUIREMENTS)
    foreign = smalti_cli("admit", str(model), "--policy", str(policy), "--trainer-pubkey",
                         str(g.keys / "model-risk.pub"), "--model-pubkey", str(root / "keys" / "trainer-model.pub"))
    assert foreign.returncode != 0 and "not signed by trainer key" in foreign.stderr


def test_a_policy_that_is_not_valid_cel_is_refused_in_one_line(exported, evaluated_governance):
    g, (root, model) = evaluated_governance, exported
    done, _ = admit(root, model, g, {"broken": "model.classes.exists(c, "})
    assert done.returncode != 0 and "requirement 'broken' is not valid CEL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_evaluation_of_other_weights_does_not_count_even_when_the_trainer_signed_it_in(
    exported, evaluated_governance, tmp_path
):
    """Defence in depth: a trainer who signs a folder carrying an evaluation of another model (its weights_sha256
    is not the one the final ledger head signs) gets a valid signature, and the evaluation still does not count."""
    import shutil

    from smalti.checkpoint import load_payload
    from smalti.evaluation.attestation import evaluation_statement
    from smalti.trust.keys import SigningKey
    from smalti.workflows.provenance import PROVENANCE, SIGNATURE, sign_envelope, sign_model

    g, (root, model) = evaluated_governance, exported
    copy = tmp_path / "model"
    shutil.copytree(model, copy, ignore=shutil.ignore_patterns(PROVENANCE, SIGNATURE))
    carried = copy / "evaluations" / "lab-evals-ep0-ba4.intoto.json"
    statement = json.loads(base64.b64decode(json.loads(carried.read_text())["payload"]))
    statement["predicate"]["model"]["weights_sha256"] = "0" * 64
    carried.write_text(json.dumps(sign_envelope(evaluation_statement(statement["subject"], statement["predicate"]),
                                                SigningKey.load(g.key("evaluator")))))
    checkpoint = sorted((root / "run" / "checkpoints").glob("ep*-ba*.pt"))[-1]
    sign_model(copy, root / "run", load_payload(checkpoint, tensors=False).to_dict(), SigningKey.load(g.key("trainer")),
               root / "keys" / "trainer-model.key")
    done, _ = admit(root, copy, g, REQUIREMENTS, "--evaluator", f"lab-evals={g.keys / 'evaluator.pub'}")
    assert done.returncode == 1, done.stderr
    assert "not counted: evaluations/lab-evals-ep0-ba4.intoto.json: an evaluation of other weights" in done.stderr
    assert "'evaluated by lab-evals' failed" in done.stderr


def test_admit_never_imports_torch(exported, evaluated_governance):
    """A deployer's admission step runs where no model is loaded: in a fresh interpreter, torch is never imported."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from cli_startup import probe

    g, (root, model) = evaluated_governance, exported
    policy = root / "one.yaml"
    policy.write_text(yaml.safe_dump({"admit": "one", "requirements": [{"name": "final", "expr": "model.ledger.final"}]}))
    outcome = probe(["admit", str(model), "--policy", str(policy), "--trainer-pubkey", str(g.keys / "trainer.pub"),
                     "--model-pubkey", str(root / "keys" / "trainer-model.pub")], REPO)
    assert outcome.torch is False, outcome.stderr
