"""``smalti evaluate RUN --key EVALUATOR_KEY``: measure a run and sign the results as an evaluator."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="measure a run (held-out loss per class, benchmark tasks) and sign the results as an evaluator",
        description="Verify RUN's ledger, then measure its latest checkpoint: the held-out loss of every class and "
        "the benchmark tasks of each --tasks folder (lm-evaluation-harness task YAMLs with local data; default: "
        "the bundled Shakespeare tasks). Write an in-toto statement of the results, signed in DSSE with the "
        "evaluator's key, to RUN/evaluations/ (or --out). See docs/closure.md.",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory written by 'smalti train'")
    parser.add_argument("--key", required=True, help="the evaluator's private key (a file, or a pkcs11: URI)")
    parser.add_argument(
        "--tasks",
        type=Path,
        action="append",
        default=None,
        metavar="DIR",
        help="a folder of task YAMLs (repeatable; default: the bundled Shakespeare tasks). Data files must be local",
    )
    parser.add_argument("--no-tasks", action="store_true", help="held-out losses only, no benchmark tasks")
    parser.add_argument("--no-held-out", action="store_true", help="benchmark tasks only, no held-out losses")
    parser.add_argument("--limit", type=int, default=None, help="score at most this many items per task")
    parser.add_argument("--name", help="the evaluator's name, for a run without a taxonomy to name it")
    parser.add_argument(
        "--trainer-pubkey",
        type=Path,
        help="the trainer key its ledger is checked against (default: the taxonomy's trainer)",
    )
    parser.add_argument("--out", type=Path, help="where to write the attestation (default RUN/evaluations/)")
    parser.add_argument("--json", action="store_true", help="print the statement as JSON")
    parser.set_defaults(run=run, trains=True)


def run(args: argparse.Namespace) -> int:
    import json

    from smalti.evaluation.evaluate import evaluate_run
    from smalti.evaluation.harness import BUNDLED_TASKS, read_task_folder
    from smalti.trust.keys import PublicKey, SigningKey

    if args.limit is not None and args.limit < 1:
        raise SmaltiError(f"--limit must be at least 1, got {args.limit}")
    if args.no_tasks and args.no_held_out:
        raise SmaltiError("--no-tasks and --no-held-out leave nothing to evaluate")
    tasks = [] if args.no_tasks else [t for folder in args.tasks or [BUNDLED_TASKS] for t in read_task_folder(folder)]
    trainer = PublicKey.load(args.trainer_pubkey) if args.trainer_pubkey else None
    evaluation = evaluate_run(
        args.run_dir, SigningKey.load(args.key), tasks, args.limit, args.name, not args.no_held_out, trainer, args.out
    )
    predicate = evaluation.statement["predicate"]
    if args.json:
        print(json.dumps(evaluation.statement, indent=1))
        return 0
    print(f"evaluated {args.run_dir} ({predicate['model']['checkpoint']}) as {predicate['evaluator']['name']}")
    for task in predicate["tasks"]:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in task["metrics"].items() if k != "items" and "stderr" not in k)
        print(f"  {task['name']:<32} {metrics}  ({task['metrics'].get('items', 0)} items)")
    for name, loss in sorted(((predicate.get("held_out") or {}).get("losses_by_class") or {}).items()):
        print(f"  held-out {name:<40} loss {loss:.4f}")
    print(f"signed attestation: {evaluation.path}")
    return 0
