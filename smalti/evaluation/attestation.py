"""An evaluation as a signed attestation: an in-toto Statement v1 in a DSSE envelope, signed by an evaluator.

Why in-toto and DSSE: an evaluation is a claim by one party (the evaluator) about an artifact (the model's
files), which is exactly what an in-toto statement is, and the deployer, the auditor and any supply-chain tool
already verify those envelopes. The in-toto test-result predicate records pass/fail counts, not measured
values, so the predicate is Smalti's own, documented in docs/closure.md::

    predicateType: https://smalti.dev/attestation/evaluation/v1
    predicate:
      evaluator: {name, key_id}
      model: {run, checkpoint, weights_sha256, ledger: {checkpoint: <C2SP signed note>, verifier_key, entries}}
      harness: {name: lm-evaluation-harness, version, smalti}
      tasks: [{name, definition: {name, sha256}, data: [{name, sha256}], metrics: {acc, acc_stderr, ...}, items}]
      held_out: {losses_by_class: {class: loss}, recipe_fingerprint}
      evaluated_on: ISO 8601 time

The subject is the evaluated model's files by sha256 (for a run: its checkpoint), so an attestation of one
model never passes for another's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.workflows.dsse import PAYLOAD_TYPE, STATEMENT_TYPE, EnvelopeError, open_envelope, sign_envelope

PREDICATE_TYPE = "https://smalti.dev/attestation/evaluation/v1"
MAX_EVALUATIONS, MAX_EVALUATION_BYTES = 100, 1 << 20  # what one reading of a run's evaluations reads at most
EVALUATIONS = "evaluations"  # the folder of a run (or an export) that holds its evaluation attestations
SUFFIX = ".intoto.json"


class AttestationError(SmaltiError):
    """An evaluation attestation that does not hold."""


def evaluation_statement(subject: list[dict[str, Any]], predicate: dict[str, Any]) -> dict[str, Any]:
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def sign_evaluation(statement: dict[str, Any], key: SigningKey) -> dict[str, Any]:
    return sign_envelope(statement, key)


def read_evaluation(path: Path, evaluators: dict[str, PublicKey]) -> tuple[str, dict[str, Any]]:
    """The statement in an attestation file, and the name of the evaluator (of ``evaluators``) whose key signed
    it; refused in one line if none did, or if it is not an evaluation statement."""
    try:
        envelope = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AttestationError(f"{path}: not a readable JSON envelope ({error})") from None
    if not isinstance(envelope, dict) or envelope.get("payloadType") != PAYLOAD_TYPE:
        raise AttestationError(f"{path}: not a DSSE envelope of an in-toto statement")
    for name, key in evaluators.items():
        try:
            statement = open_envelope(envelope, key)
        except EnvelopeError:
            continue
        if statement.get("predicateType") != PREDICATE_TYPE or statement.get("_type") != STATEMENT_TYPE:
            raise AttestationError(f"{path}: signed by {name}, but not an evaluation statement ({PREDICATE_TYPE})")
        return name, statement
    known = ", ".join(f"{n} ({k.key_id})" for n, k in evaluators.items()) or "none"
    raise AttestationError(f"{path}: not signed by any evaluator the taxonomy names (known: {known})")


def check_evaluations(
    folder: Path, file_of: Callable[[str], Path | None], evaluators: dict[str, PublicKey]
) -> list[dict[str, Any]]:
    """Each attestation in a run's ``folder`` of evaluations (at most 100, of at most 1 MB each), checked against
    ``evaluators``: ``{name, verified: True, evaluator, statement}``, or ``{name, verified: False, problem}``.
    ``file_of(name)`` is the file as the caller's rules allow it to be read (None: refused, e.g. a link)."""
    names = sorted(e.name for e in os.scandir(folder) if e.name.endswith(SUFFIX))[:MAX_EVALUATIONS]
    found: list[dict[str, Any]] = []
    for name in names:
        path = file_of(name)
        if path is None:
            found.append({"name": name, "verified": False, "problem": "not a regular file"})
        elif path.stat().st_size > MAX_EVALUATION_BYTES:
            found.append({"name": name, "verified": False, "problem": f"larger than {MAX_EVALUATION_BYTES} bytes"})
        else:
            try:
                evaluator, statement = read_evaluation(path, evaluators)
                found.append({"name": name, "verified": True, "evaluator": evaluator, "statement": statement})
            except AttestationError as error:
                found.append({"name": name, "verified": False, "problem": str(error).split(": ", 1)[-1]})
    return found


def evaluations_of(folder: Path) -> list[Path]:
    """The attestation files a run or an export folder holds, in name order."""
    directory = Path(folder) / EVALUATIONS
    return sorted(p for p in directory.glob(f"*{SUFFIX}") if p.is_file()) if directory.is_dir() else []


def evaluator_keys(run: Path) -> dict[str, PublicKey]:
    """The evaluators the run's taxonomy names, by name (none without a taxonomy)."""
    taxonomy = run_taxonomy(run)
    return evaluators_of(taxonomy) if taxonomy is not None else {}


def evaluators_of(taxonomy: Any) -> dict[str, PublicKey]:
    """A taxonomy's evaluator authorities, by name."""
    return {n: a.key for n, a in taxonomy.authorities.items() if a.role == "evaluator" and a.key is not None}


def run_taxonomy(run: Path):
    """The signed taxonomy a run's recipe names, verified against its data-governance key (None without one)."""
    from smalti.config import load_recipe
    from smalti.trust.taxonomy import Taxonomy

    recipe = load_recipe(Path(run) / "recipe.yaml")
    if recipe.data.taxonomy is None or recipe.data.trust is None:
        return None
    return Taxonomy.load(recipe.data.taxonomy, PublicKey.load(recipe.data.trust))
