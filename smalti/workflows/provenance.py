"""A signed model: what binds an exported model folder to the run that trained it.

Two signatures, each in the format its ecosystem's own tools check:

- ``model.sig``: the OpenSSF model signing bundle (OMS, a Sigstore bundle), made with the ``model_signing``
  library over every file of the folder; ``model_signing verify key DIR --signature DIR/model.sig
  --public_key KEY.pub`` checks it. The library signs with ECDSA keys (NIST P-256/384/521, the key types
  Sigstore bundles carry), so the trainer authority holds a P-256 key for it (``smalti keys new NAME
  --type ecdsa-p256``) beside the Ed25519 key its ledger heads need (C2SP notes are Ed25519).
- ``provenance.intoto.json``: an in-toto Statement v1 in a DSSE envelope signed by the trainer's Ed25519
  key, with a SLSA Provenance v1 predicate. Its subject is every model file's sha256. It records the
  recipe, the datasets (manifest roots), the taxonomy and policy fingerprints, the final ledger head as a
  C2SP signed note with its verifier key, the lineage, and any deletion certificate.

The provenance file is written first and is itself covered by ``model.sig``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.workflows.dsse import PAYLOAD_TYPE, STATEMENT_TYPE, EnvelopeError, open_envelope, sign_envelope

__all__ = ["PAYLOAD_TYPE", "STATEMENT_TYPE", "sign_envelope", "verify_envelope", "sign_model", "statement"]

PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:smalti:build-type:train:v1"  # documented in docs/models.md (Signed models)
PROVENANCE = "provenance.intoto.json"
SIGNATURE = "model.sig"


class ProvenanceError(SmaltiError):
    """A model folder whose signatures or provenance do not hold."""


def _model_signing():
    try:
        import model_signing
    except ImportError:
        raise ProvenanceError("signed models need the signing extra: pip install 'smalti[signing]'") from None
    return model_signing


def file_digests(directory: Path, skip: tuple[str, ...] = (SIGNATURE, PROVENANCE)) -> list[dict[str, Any]]:
    """in-toto subjects: every file under ``directory`` by relative path, with its sha256."""
    from smalti.io import file_sha256

    return [
        {"name": path.relative_to(directory).as_posix(), "digest": {"sha256": file_sha256(path)}}
        for path in sorted(directory.rglob("*"))
        if path.is_file() and path.name not in skip
    ]


def _descriptor(name: str, content: bytes, media_type: str, **annotations: Any) -> dict[str, Any]:
    return {
        "name": name,
        "digest": {"sha256": hashlib.sha256(content).hexdigest()},
        "mediaType": media_type,
        "content": base64.b64encode(content).decode(),
        **({"annotations": annotations} if annotations else {}),
    }


def _dependencies(run: Path, checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """What the model was built from: each signed dataset, and each ancestor's signed head the run started from."""
    from smalti.governance.lineage import chain

    data = checkpoint.get("data") or {}
    datasets = data.get("datasets") if data.get("source") == "mixture" else [data]
    dependencies = [
        {
            "name": f"dataset {d.get('name', '')}".strip(),
            "uri": _uri(d["url"]),
            "digest": {"sha256": d["manifest_sha256"]},
            "annotations": {
                "manifest_root": d.get("manifest_root"),
                "manifest_version": d.get("manifest_version"),
                "signer": d.get("signer"),
                "taxonomy": d.get("taxonomy"),
            },
        }
        for d in datasets or []
        if d.get("url")
    ]
    for parent, link in chain(run):  # the lineage: each ancestor's signed head the child started from
        dependencies.append(
            {
                "name": f"parent run ({link.kind})",
                "uri": Path(parent).resolve().as_uri(),
                "digest": {"sha256": link.head.get("weights") or link.start_weights_sha256 or ""},
                "annotations": {k: v for k, v in link.to_json().items() if k != "run_dir"},
            }
        )
    return dependencies


def final_ledger_checkpoint(run: Path) -> dict[str, Any]:
    """The run's final signed tree head as a C2SP signed note, with its verifier key, size, origin and time: what
    an attestation about the run's model names (it does not verify the ledger; the caller has)."""
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.trust.note import verifier_key

    store = LedgerStore(ledger_path(run))
    try:
        heads, origin = store.heads(), store.origin
        trainer = store.trainer_key
    finally:
        store.close()
    if not heads or not heads[-1].final:
        raise ProvenanceError(f"{run}: the ledger has no final signed tree head; attest models of finished runs")
    return {
        "checkpoint": heads[-1].note(trainer.raw),
        "verifier_key": verifier_key(origin, trainer.raw),
        "entries": heads[-1].size,
        "origin": origin,
        "finished_on": heads[-1].timestamp,
        "weights": heads[-1].weights,  # sha256 of the final weights, as the head signs them
    }


def include_evaluations(directory: Path, run: Path, checkpoint_name: str) -> list[str]:
    """Copy into ``directory/evaluations/`` each of the run's evaluation attestations that an evaluator of its
    taxonomy signed about this very checkpoint; the others stay out (a run folder is not trusted). Returns the
    names included."""
    import shutil

    from smalti.evaluation.attestation import (
        EVALUATIONS,
        AttestationError,
        evaluations_of,
        evaluator_keys,
        read_evaluation,
    )

    included = []
    keys = evaluator_keys(run)
    weights = final_ledger_checkpoint(run)["weights"]
    for path in evaluations_of(run):
        try:
            _, attested = read_evaluation(path, keys)
        except AttestationError:
            continue
        measured = attested["predicate"].get("model", {})
        if measured.get("checkpoint") != checkpoint_name or measured.get("weights_sha256") != weights:
            continue  # an evaluation of another checkpoint, or of another run's weights copied in
        (directory / EVALUATIONS).mkdir(exist_ok=True)
        shutil.copyfile(path, directory / EVALUATIONS / path.name)
        included.append(path.name)
    return included


def statement(
    directory: Path, run: Path, checkpoint: dict[str, Any], evaluations: Sequence[str] = ()
) -> dict[str, Any]:
    """The in-toto Statement (SLSA Provenance v1) for the model files in ``directory``, trained in ``run``."""
    from smalti.workflows.certificate import CERTIFICATE, ablated_classes
    from smalti.governance.lineage import run_entry
    from smalti.software import software

    ledger = final_ledger_checkpoint(run)
    entry = run_entry(run)
    dependencies = _dependencies(run, checkpoint)
    byproducts = [
        _descriptor(
            "ledger checkpoint",
            ledger["checkpoint"].encode(),
            "text/plain; charset=utf-8",
            verifier_key=ledger["verifier_key"],
            entries=ledger["entries"],
        )
    ]
    if (run / CERTIFICATE).is_file():
        byproducts.append(_descriptor("deletion certificate", (run / CERTIFICATE).read_bytes(), "application/json"))
    for name in evaluations:  # copied into the folder, so also subjects; here so a reader finds them named
        content = (directory / "evaluations" / name).read_bytes()
        byproducts.append(_descriptor(f"evaluation {name}", content, "application/vnd.dsse.envelope.v1+json"))
    return {
        "_type": STATEMENT_TYPE,
        "subject": file_digests(directory),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"recipe": checkpoint["recipe"]},
                "internalParameters": {
                    "recipe_fingerprint": checkpoint.get("recipe_fingerprint"),
                    "fingerprints": entry.get("fingerprints", {}),
                    "classes": entry.get("classes", []),
                    "trained_to": checkpoint.get("timestamp"),
                    "adapters_left_out": {
                        "classes": ablated_classes(run),
                        "why": "ablated by smalti forget (the deletion certificate is a byproduct): not exported",
                    },
                },
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": "urn:smalti:trainer", "version": software()},
                "metadata": {"invocationId": ledger["origin"], "finishedOn": ledger["finished_on"]},
                "byproducts": byproducts,
            },
        },
    }


def _uri(location: str) -> str:
    """A dataset's URL as a URI (a local path becomes file://)."""
    return location if "://" in location else Path(location).resolve().as_uri()


def verify_envelope(envelope: dict[str, Any], trainer: PublicKey) -> dict[str, Any]:
    """The statement in a DSSE envelope, after checking the trainer key signed it."""
    try:
        return open_envelope(envelope, trainer, "trainer")
    except EnvelopeError as error:
        raise ProvenanceError(f"{PROVENANCE}: {error}") from None


def sign_model(
    directory: Path,
    run: Path,
    checkpoint: dict[str, Any],
    trainer_key: SigningKey,
    model_key: Path,
    checkpoint_name: str | None = None,
) -> list[str]:
    """Copy in the run's evaluations of checkpoint ``checkpoint_name`` (``include_evaluations``), write
    ``provenance.intoto.json``, then ``model.sig`` over the whole folder (both included). Returns the names of
    the evaluations included."""
    model_signing = _model_signing()
    directory = Path(directory).resolve()  # model_signing compares ignored paths with the absolute ones it walks

    from smalti.io import atomic_write_text

    if trainer_key.public.key_id != _ledger_key(run).key_id:
        raise ProvenanceError(
            f"the trainer key {trainer_key.public.key_id} is not the key that signed {run}'s ledger "
            f"({_ledger_key(run).key_id})"
        )
    check_model_key(model_key)
    included = include_evaluations(directory, run, checkpoint_name) if checkpoint_name else []
    envelope = sign_envelope(statement(directory, run, checkpoint, included), trainer_key)
    atomic_write_text(directory / PROVENANCE, json.dumps(envelope, indent=1) + "\n")
    config = model_signing.signing.Config()
    try:
        if str(model_key).startswith("pkcs11:"):  # a P-256 key in a token, through model_signing's own PKCS#11 signer
            from smalti.trust.pkcs11 import with_module_and_pin

            config = config.use_pkcs11_signer(pkcs11_uri=with_module_and_pin(str(model_key)))
        else:
            config = config.use_elliptic_key_signer(private_key=model_key)
        (
            config.set_hashing_config(
                model_signing.hashing.Config().set_ignored_paths(paths=[directory / SIGNATURE])
            ).sign(directory, directory / SIGNATURE)
        )
    except (ValueError, TypeError, OSError, RuntimeError) as error:
        raise ProvenanceError(
            f"--model-key {model_key}: {error} (an ECDSA P-256/384/521 PEM private key: "
            f"smalti keys new NAME --type ecdsa-p256)"
        ) from None
    return included


def check_model_key(path: Path) -> None:
    """model_signing signs with NIST-curve ECDSA keys only; say so in one line before any work is done (a key
    in a PKCS#11 token is checked by model_signing when it signs)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if str(path).startswith("pkcs11:"):
        return

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise ProvenanceError(f"--model-key {path}: not a readable PEM private key ({error})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
        raise ProvenanceError(
            f"--model-key {path}: OpenSSF model signing needs an ECDSA P-256/384/521 key "
            "(smalti keys new NAME --type ecdsa-p256)"
        )


def _ledger_key(run: Path) -> PublicKey:
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    store = LedgerStore(ledger_path(run))
    try:
        return store.trainer_key
    finally:
        store.close()


def verify_model(directory: Path, trainer: PublicKey, model_key: Path) -> list[str]:
    """Check a signed model folder; the lines of what holds, or ``ProvenanceError`` naming what does not."""
    model_signing = _model_signing()
    shown = directory
    # model_signing walks the folder as absolute paths and compares the ignored signature file with them: a
    # relative path ("export/model") made it see model.sig as an extra file.
    directory = Path(directory).resolve()

    from smalti.trust.note import Checkpoint, NoteError, Verifier, open_note

    for name in (SIGNATURE, PROVENANCE):
        if not (directory / name).is_file():
            raise ProvenanceError(f"{directory}: no {name}; not a signed model folder (smalti export --sign)")
    try:
        (
            model_signing.verifying.Config()
            .use_elliptic_key_verifier(public_key=model_key)
            .set_hashing_config(model_signing.hashing.Config().set_ignored_paths(paths=[directory / SIGNATURE]))
            .verify(directory, directory / SIGNATURE)
        )
    except Exception as error:  # the library raises ValueError and others; any failure is the answer
        raise ProvenanceError(f"{directory / SIGNATURE}: the model signature does not verify ({error})") from None
    lines = [f"model signature OK: every file of {shown} (OMS bundle, key {model_key})"]
    try:
        envelope = json.loads((directory / PROVENANCE).read_text())
    except ValueError as error:
        raise ProvenanceError(f"{directory / PROVENANCE}: not JSON ({error})") from None
    payload = verify_envelope(envelope, trainer)
    if payload.get("_type") != STATEMENT_TYPE or payload.get("predicateType") != PREDICATE_TYPE:
        raise ProvenanceError(f"{directory / PROVENANCE}: not an in-toto v1 statement with SLSA provenance v1")
    subjects = {s["name"]: s["digest"]["sha256"] for s in payload["subject"]}
    actual = {s["name"]: s["digest"]["sha256"] for s in file_digests(directory)}
    if subjects != actual:
        changed = sorted(set(subjects) ^ set(actual) | {n for n in subjects if actual.get(n) != subjects[n]})
        raise ProvenanceError(f"{directory}: the files differ from the provenance's subjects ({', '.join(changed)})")
    lines.append(f"provenance OK: in-toto statement signed by trainer key {trainer.key_id}, {len(subjects)} files")
    predicate = payload["predicate"]
    for product in predicate["runDetails"].get("byproducts", []):
        if product.get("name") != "ledger checkpoint":
            continue
        note = base64.b64decode(product["content"]).decode()
        try:
            verifier = Verifier.parse(product["annotations"]["verifier_key"])
            if verifier.public != trainer.raw:
                raise NoteError("its verifier key is not the trainer key")
            checkpoint = Checkpoint.parse(open_note(note, [verifier])[0])
        except (NoteError, KeyError) as error:
            raise ProvenanceError(f"{PROVENANCE}: the ledger checkpoint does not verify ({error})") from None
        lines.append(
            f"ledger checkpoint OK: {checkpoint.origin} at size {checkpoint.size}, final "
            f"{checkpoint.extension('final')}"
        )
    return lines
