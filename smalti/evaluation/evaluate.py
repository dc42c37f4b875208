"""``smalti evaluate``: measure a trained run and sign what was measured, as an evaluator.

The steps, each refused in one line where it does not hold:

1. the run's ledger verifies against its trainer key (the taxonomy's, or ``--trainer-pubkey``), and ends in a
   final signed tree head: an evaluation names the history of what it measured;
2. the evaluator's key is an ``evaluator`` authority of the run's taxonomy (runs without one name themselves);
3. the held-out loss of every class, with the trainer's own evaluation code (``losses_by_class``), and the
   benchmark tasks through lm-eval (``smalti.evaluation.harness``);
4. an in-toto statement whose subject is the checkpoint evaluated (``smalti.evaluation.attestation``), signed
   in DSSE by the evaluator and written whole or not at all to ``RUN/evaluations/`` (or ``--out``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from smalti.evaluation.attestation import (
    EVALUATIONS,
    SUFFIX,
    evaluation_statement,
    evaluators_of,
    run_taxonomy,
    sign_evaluation,
)
from smalti.evaluation.harness import EvaluationError, TaskDefinition, harness_version, run_tasks
from smalti.trust.keys import PublicKey, SigningKey


@dataclass
class Evaluation:
    path: Path
    statement: dict[str, Any]


def evaluator_name(run: Path, taxonomy: Any, key: SigningKey, name: str | None) -> str:
    """The run's taxonomy's name for the evaluator whose key this is; a run without a taxonomy takes ``name``."""
    if taxonomy is None:
        if not name:
            raise EvaluationError(f"{run} has no taxonomy to name its evaluators: give --name")
        return name
    for evaluator, public in evaluators_of(taxonomy).items():
        if public.raw == key.public.raw:
            if name and name != evaluator:
                raise EvaluationError(f"--name {name}: the taxonomy names this key's evaluator {evaluator!r}")
            return evaluator
    raise EvaluationError(
        f"key {key.public.key_id} is not an evaluator of taxonomy {taxonomy.name!r}: data governance adds one with "
        "'smalti taxonomy init ... --evaluator NAME=PUB' and signs the taxonomy again"
    )


def trainer_key(run: Path, taxonomy: Any, given: PublicKey | None) -> PublicKey:
    key = given or (taxonomy.key_of_role("trainer") if taxonomy is not None else None)
    if key is None:
        raise EvaluationError(f"{run}: no trainer key to verify its ledger with: give --trainer-pubkey")
    return key


def evaluate_run(
    run: Path,
    key: SigningKey,
    tasks: list[TaskDefinition],
    limit: int | None = None,
    name: str | None = None,
    held_out: bool = True,
    trainer: PublicKey | None = None,
    out: Path | None = None,
) -> Evaluation:
    from smalti.checkpoint import checkpoint_sha256, load_payload, weights_sha256
    from smalti.governance.ledger.verify import verify_ledger
    from smalti.generation import load_trained_model
    from smalti.io import atomic_write_text
    from smalti.software import software
    from smalti.workflows.deletion import losses_by_class
    from smalti.workflows.provenance import final_ledger_checkpoint

    run = Path(run)
    if not (run / "recipe.yaml").is_file():
        raise EvaluationError(f"{run}: not a run directory (no recipe.yaml)")
    taxonomy = run_taxonomy(run)
    evaluator = evaluator_name(run, taxonomy, key, name)
    report = verify_ledger(run, trainer_key(run, taxonomy, trainer))
    if not report.ok:
        raise EvaluationError(f"{run}: its ledger does not verify ({report.problem}); nothing was evaluated")
    ledger = final_ledger_checkpoint(run)
    model, tokenizer, checkpoint = load_trained_model(run)
    checkpoint_path = Path(checkpoint)
    weights = weights_sha256(load_payload(checkpoint_path).model or {})
    if ledger["weights"] and weights != ledger["weights"]:
        raise EvaluationError(
            f"{checkpoint_path}: its weights ({weights[:12]}...) are not the ones the ledger's final signed head "
            f"names ({ledger['weights'][:12]}...); nothing was evaluated"
        )
    if tokenizer is None:
        raise EvaluationError(f"{checkpoint}: not a language model; smalti evaluate runs language tasks")
    results = run_tasks(model, tokenizer, tasks, limit) if tasks else {}
    losses = losses_by_class(run / "recipe.yaml", [checkpoint_path])[0] if held_out else None
    predicate = {
        "evaluator": {"name": evaluator, "key_id": key.public.key_id},
        "model": {
            "run": ledger["origin"],
            "checkpoint": checkpoint_path.name,
            "weights_sha256": weights,
            "ledger": {k: ledger[k] for k in ("checkpoint", "verifier_key", "entries")},
        },
        "harness": {
            "name": "lm-evaluation-harness",
            "version": harness_version() if tasks else None,
            "smalti": software()["smalti"],
        },
        "tasks": [
            {
                "name": t.name,
                "definition": {"name": t.definition.name, "sha256": t.definition_sha256},
                "data": [{"name": n, "sha256": d} for n, d in sorted(t.data.items())],
                "metrics": results[t.name],
            }
            for t in tasks
        ],
        "held_out": {"losses_by_class": losses} if losses is not None else None,
        "evaluated_on": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    subject = [
        {"name": f"checkpoints/{checkpoint_path.name}", "digest": {"sha256": checkpoint_sha256(checkpoint_path)}}
    ]
    statement = evaluation_statement(subject, predicate)
    envelope = sign_evaluation(statement, key)
    target = out or run / EVALUATIONS / f"{evaluator}-{checkpoint_path.stem}{SUFFIX}"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(envelope, indent=1) + "\n")
    return Evaluation(target, statement)
