"""``smalti admit``: a deployer checks a signed model's record, then its own requirements written in CEL.

Two stages, so that a requirement is only ever evaluated over facts that were verified:

1. **The record** (``model_record``): the folder's OpenSSF model signature and its in-toto provenance, signed by
   the trainer (``verify_model``); the final ledger head the provenance carries, as a C2SP note by the trainer;
   the deletion certificates it names, each signed by the trainer; and the evaluation attestations the folder
   carries, each signed by an evaluator the deployer trusts and about these very weights (the ``weights_sha256``
   it names is the one the ledger's final head signs). An attestation that fails a check is not a fact: it is
   listed under ``refused`` with why, and a requirement that needs it fails.
2. **The deploy policy**: named requirements, each a CEL expression (the language Kubernetes admission policies
   use; evaluated with ``cel-python``) over ``model``. Every requirement is evaluated; every one that is not
   ``true`` is reported, one line each.

If every requirement holds, a SLSA Verification Summary Attestation (VSA v1) signed by the deployer's key names
the policy's digest and every input it checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.workflows.dsse import STATEMENT_TYPE, sign_envelope

VSA_PREDICATE = "https://slsa.dev/verification_summary/v1"
VERIFIER_ID = "urn:smalti:admit"


class AdmissionError(SmaltiError):
    """A deploy policy that cannot be read, or a model whose record cannot be read at all."""


@dataclass
class Requirement:
    name: str
    expression: str
    program: Any


@dataclass
class DeployPolicy:
    name: str
    requirements: list[Requirement]
    sha256: str
    path: Path


def load_policy(path: Path) -> DeployPolicy:
    """A deploy policy: ``admit: NAME`` and ``requirements: [{name, expr}]``; every expression compiled up front."""
    try:
        import celpy
    except ImportError:
        raise AdmissionError("smalti admit needs cel-python: pip install 'smalti[admit]'") from None
    try:
        raw = Path(path).read_bytes()
        spec = yaml.safe_load(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise AdmissionError(f"{path}: not a readable YAML deploy policy ({error})") from None
    if not isinstance(spec, dict) or set(spec) - {"admit", "requirements"}:
        raise AdmissionError(f"{path}: a deploy policy is a mapping with 'admit' (its name) and 'requirements'")
    listed = spec.get("requirements")
    if not isinstance(spec.get("admit"), str) or not isinstance(listed, list) or not listed:
        raise AdmissionError(f"{path}: 'admit' names the policy and 'requirements' lists at least one requirement")
    environment = celpy.Environment()
    requirements, seen = [], set()
    for index, item in enumerate(listed):
        if (
            not isinstance(item, dict)
            or set(item) != {"name", "expr"}
            or not all(isinstance(item[k], str) and item[k] for k in ("name", "expr"))
        ):
            raise AdmissionError(f"{path}: requirement {index + 1} must be {{name: ..., expr: ...}}, both text")
        if item["name"] in seen:
            raise AdmissionError(f"{path}: two requirements are named {item['name']!r}")
        seen.add(item["name"])
        try:
            program = environment.program(environment.compile(item["expr"]))
        except Exception as error:  # celpy raises its own parse errors
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise AdmissionError(f"{path}: requirement {item['name']!r} is not valid CEL ({first})") from None
        requirements.append(Requirement(item["name"], item["expr"], program))
    return DeployPolicy(spec["admit"], requirements, hashlib.sha256(raw).hexdigest(), Path(path))


def model_record(
    directory: Path, trainer: PublicKey, model_key: Path, evaluators: dict[str, PublicKey]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The verified facts about a signed model folder (``model`` for CEL), and the inputs checked (for the VSA)."""
    from smalti.evaluation.attestation import EVALUATIONS, AttestationError, read_evaluation
    from smalti.trust.note import Checkpoint, Verifier, open_note
    from smalti.workflows.certificate import signed_message
    from smalti.workflows.provenance import PROVENANCE, file_digests, verify_envelope, verify_model

    directory = Path(directory)
    verify_model(directory, trainer, model_key)  # raises, naming what does not hold
    envelope = json.loads((directory / PROVENANCE).read_text())
    provenance = verify_envelope(envelope, trainer)
    predicate = provenance["predicate"]
    internal = predicate["buildDefinition"].get("internalParameters", {})
    inputs = [{"uri": PROVENANCE, "digest": {"sha256": _sha256(directory / PROVENANCE)}}]
    weights, ledger = "", {}
    deletions = []
    for product in predicate["runDetails"].get("byproducts", []):
        content = base64.b64decode(product.get("content", ""))
        if product.get("name") == "ledger checkpoint":
            verifier = Verifier.parse(product["annotations"]["verifier_key"])
            checkpoint = Checkpoint.parse(open_note(content.decode(), [verifier])[0])  # verify_model checked it
            weights = checkpoint.extension("weights") or ""
            ledger = {
                "origin": checkpoint.origin,
                "entries": checkpoint.size,
                "final": checkpoint.extension("final") == "true",
            }
        elif product.get("name") == "deletion certificate":
            certificate = json.loads(content)
            signed = isinstance(certificate, dict) and trainer.verify(
                bytes.fromhex(str(certificate.get("signature", ""))), signed_message(certificate)
            )
            deletions.append(
                {
                    "classes": list(certificate.get("classes") or [certificate.get("class")]),
                    "mode": certificate.get("mode"),
                    "verified": bool(signed),
                }
            )
    evaluations, refused = [], []
    folder = directory / EVALUATIONS
    for path in sorted(folder.glob("*.intoto.json")) if folder.is_dir() else []:
        inputs.append({"uri": f"{EVALUATIONS}/{path.name}", "digest": {"sha256": _sha256(path)}})
        try:
            evaluator, statement = read_evaluation(path, evaluators)
        except AttestationError as error:
            refused.append({"file": path.name, "why": str(error).split(": ", 1)[-1]})
            continue
        attested = statement["predicate"]
        if not weights or attested.get("model", {}).get("weights_sha256") != weights:
            refused.append({"file": path.name, "why": "an evaluation of other weights than this model's"})
            continue
        evaluations.append(
            {
                "file": path.name,
                "evaluator": evaluator,
                "tasks": {t["name"]: t.get("metrics", {}) for t in attested.get("tasks", []) if isinstance(t, dict)},
                "held_out": (attested.get("held_out") or {}).get("losses_by_class") or {},
            }
        )
    model = {
        "files": {s["name"]: s["digest"]["sha256"] for s in file_digests(directory)},
        "weights_sha256": weights,
        "ledger": ledger,
        "classes": internal.get("classes", []),
        "fingerprints": internal.get("fingerprints", {}),
        "recipe": predicate["buildDefinition"].get("externalParameters", {}).get("recipe", {}),
        "lineage": [
            {"uri": d.get("uri"), "weights": d.get("digest", {}).get("sha256"), **(d.get("annotations") or {})}
            for d in predicate["buildDefinition"].get("resolvedDependencies", [])
            if str(d.get("name", "")).startswith("parent run")
        ],
        "deletions": deletions,
        "deleted_classes": sorted({c for d in deletions if d["verified"] for c in d["classes"] if c}),
        "evaluations": evaluations,
        "refused": refused,
    }
    return model, inputs


def check(policy: DeployPolicy, model: dict[str, Any]) -> list[str]:
    """Every requirement that does not hold, one line each (empty: admitted)."""
    import celpy

    bindings = {"model": celpy.json_to_cel(model)}
    failed = []
    for requirement in policy.requirements:
        try:
            result = requirement.program.evaluate(bindings)
        except Exception as error:  # a missing key, a type error: the requirement does not hold
            failed.append(f"requirement {requirement.name!r} failed: it could not be evaluated ({error})")
            continue
        if isinstance(result, Exception):  # celpy returns some evaluation errors rather than raising them
            failed.append(f"requirement {requirement.name!r} failed: it could not be evaluated ({result})")
        elif not isinstance(result, (bool, celpy.celtypes.BoolType)) or not bool(result):
            failed.append(f"requirement {requirement.name!r} failed: {requirement.expression}")
    return failed


def verification_summary(
    directory: Path, policy: DeployPolicy, inputs: list[dict[str, Any]], model: dict[str, Any], key: SigningKey
) -> dict[str, Any]:
    """A SLSA VSA v1, in DSSE, signed by the deployer: this folder passed this policy, having checked these."""
    from smalti.software import software

    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": n, "digest": {"sha256": d}} for n, d in sorted(model["files"].items())],
        "predicateType": VSA_PREDICATE,
        "predicate": {
            "verifier": {"id": f"{VERIFIER_ID}:{software()['smalti']}"},
            "timeVerified": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "resourceUri": Path(directory).resolve().as_uri(),
            "policy": {"uri": Path(policy.path).resolve().as_uri(), "digest": {"sha256": policy.sha256}},
            "inputAttestations": inputs,
            "verificationResult": "PASSED",
            "verifiedLevels": [f"SMALTI_ADMIT_{policy.name.upper().replace('-', '_')}"],
            "slsaVersion": "1.0",
        },
    }
    return sign_envelope(statement, key)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
