"""``smalti forget`` and ``smalti eval``: remove a provenance class from a trained run, and measure it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from smalti.cli.arguments import at_least_one
from smalti.cli.output import counted


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_forget_command(subparsers)
    _add_evaluation_commands(subparsers)


def _add_forget_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "forget",
        help="forget a provenance class: exact replay or ablation, with a signed certificate",
        description="Plan from RUN_DIR's verified ledger where CLASS first contributed, then either replay from the "
        "last checkpoint before it with CLASS left out of the data (--mode exact: the weights equal a "
        "run that never had it, `smalti train RECIPE --set data.exclude_classes=[CLASS]`), or reset the "
        "parameters an exclusive policy rule confines it to (--mode ablate). Writes a new run directory "
        "with its own ledger (starting from the parent's signed tree head) and a deletion certificate "
        "signed by the trainer key; `smalti ledger verify OUT` checks both. Where an ancestor of RUN_DIR "
        "(smalti train --init-from) learned CLASS, the deletion crosses the lineage: exact replays that "
        "ancestor and trains each descendant again from its new parent (the new ancestors go to "
        "OUT.lineage/), ablate resets the ancestor's confined parameters in RUN_DIR's weights. An "
        "exact replay runs at the world size RUN_DIR trained at (that is what makes it bitwise the "
        "counterfactual run): for a run trained on N ranks (DDP or FSDP2), torchrun --nproc-per-node N "
        "-m smalti forget ...",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the trained run (parent)")
    parser.add_argument(
        "--class", dest="node", required=True, metavar="CLASS", help="a class or taxonomy node (covers its subtree)"
    )
    parser.add_argument("--out", type=Path, help="the new run directory (must be new or empty)")
    parser.add_argument("--mode", choices=("exact", "ablate"), default="exact")
    parser.add_argument(
        "--reset",
        choices=("initial", "zero"),
        default="initial",
        help="ablate: reset the confined parameters to their initial values or to zero",
    )
    parser.add_argument("--key", type=Path, help="trainer private key (default: the recipe's governance.ledger.key)")
    parser.add_argument(
        "--eval-samples",
        type=at_least_one,
        default=None,
        help="held-out examples for the before/after "
        "losses, evaluated anew (default: the per-class losses the trainer recorded at the parent's "
        "and the replay's final evaluations, on the recipe's eval.max_samples examples)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--json", action="store_true", help="print the plan or certificate as JSON")
    parser.set_defaults(run=run_forget, trains=True)


def _add_evaluation_commands(subparsers: argparse._SubParsersAction) -> None:
    measure = subparsers.add_parser(
        "eval-forget",
        help="how much of a class a deletion removed: forget quality, utility, membership, relearning",
        description="Compare PARENT (trained with CLASS), FORGOTTEN (smalti forget's output) and the counterfactual "
        "that never saw CLASS (FORGOTTEN itself after an exact forget, else --counterfactual RUN) on held-out "
        "data: the loss on CLASS and a two-sample KS test of forgotten vs counterfactual per-example losses "
        "(TOFU's forget quality); every other class's loss (retained utility); the AUC of a loss-based "
        "membership attack on CLASS's training vs held-out examples; and a relearning attack: fine-tune on k "
        "examples of CLASS for a fixed budget and count the steps back to the parent's loss, against the "
        "counterfactual fine-tuned the same way (each attack a Smalti run, started from the model's verified final "
        "weights, in OUT/relearning). Writes OUT/forget-eval.json and OUT/relearning.png.",
    )
    measure.add_argument("parent", type=Path, metavar="PARENT")
    measure.add_argument("forgotten", type=Path, metavar="FORGOTTEN")
    measure.add_argument("--class", dest="node", required=True, metavar="CLASS")
    measure.add_argument(
        "--counterfactual", type=Path, help="a run that never saw CLASS (default: FORGOTTEN, if it is an exact forget)"
    )
    measure.add_argument(
        "--relearn-examples", default="16,64,256", help="k values, comma-separated (default 16,64,256)"
    )
    measure.add_argument("--relearn-steps", type=at_least_one, default=50, help="the relearning budget (default 50)")
    measure.add_argument("--relearn-lr", type=float, help="default: the parent recipe's optimizer.lr")
    measure.add_argument("--max-examples", type=at_least_one, default=512, help="examples per set (default 512)")
    measure.add_argument(
        "--checkpoint-every",
        type=at_least_one,
        help="steps between a relearning run's checkpoints "
        "(default: its last step only); each attack is a Smalti run in OUT/relearning, so a killed "
        "eval-forget resumes it",
    )
    measure.add_argument("--out", type=Path, help="default: FORGOTTEN/forget-eval")
    measure.add_argument("--json", action="store_true")
    measure.set_defaults(run=run_eval_forget, trains=True)
    evaluate = subparsers.add_parser(
        "eval",
        help="held-out loss of a run's latest checkpoint, overall or per class",
        description="Evaluate RUN_DIR's latest checkpoint on its recipe's validation split.",
    )
    evaluate.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    evaluate.add_argument("--by-class", action="store_true", help="one loss per class")
    evaluate.add_argument(
        "--max-samples",
        type=at_least_one,
        default=None,
        help="at most this many validation examples "
        "(default: the recipe's eval.max_samples, what training evaluates and records)",
    )
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=run_eval)


def run_forget(args: argparse.Namespace) -> int:
    from smalti.config import load_recipe
    from smalti.workflows.deletion import DeletionError
    from smalti.workflows.forget import forget
    from smalti.trust.keys import SigningKey

    if args.dry_run:
        return print_plan(args) if int(os.environ.get("RANK", "0")) == 0 else 0  # under torchrun, rank 0 says it
    if args.out is None:
        raise DeletionError("--out NEW_RUN_DIR is required (or --dry-run)")
    key_path = args.key or load_recipe(args.run_dir / "recipe.yaml").governance.ledger.key
    if key_path is None:
        raise DeletionError("no trainer key: pass --key (the run's recipe names none)")
    certificate = forget(
        args.run_dir, args.node, args.out, SigningKey.load(key_path), args.mode, args.reset, args.eval_samples
    )
    if not certificate:  # a rank other than 0 under torchrun: it trained its part of the replay
        return 0
    if args.json:
        print(json.dumps(certificate, indent=1))
        return 0
    print(
        f"forgot {args.node} ({certificate['mode']}): {args.out}  steps replayed: {certificate['steps_replayed']} "
        f"of {certificate['full_retrain_steps']}"
    )
    for link in certificate.get("lineage", []):
        replaced = link.get("replacement", {}).get("run_dir")
        print(f"  {link['original']['run_dir']}: {link['how']}{f' -> {replaced}' if replaced else ''}")
    before, after = certificate["evaluation"]["before"], certificate["evaluation"]["after"]
    for name in sorted(before):
        marker = "  <- forgotten" if name in certificate["classes"] else ""
        print(f"  {name:40s} loss before {before[name]:.4f}  after {after.get(name, float('nan')):.4f}{marker}")
    print(f"certificate: {args.out / 'deletion-certificate.json'} (check it: smalti ledger verify {args.out})")
    return 0


def print_plan(args: argparse.Namespace) -> int:
    """``--dry-run``: what forgetting the class takes, read from the verified ledger; changes nothing."""
    from smalti.workflows.deletion import plan_deletion
    from smalti.workflows.lineage_deletion import plan_through_lineage

    through = plan_through_lineage(args.run_dir, args.node)
    if through is not None:
        if args.json:
            print(json.dumps(through.describe(), indent=1))
            return 0
        origin = through.origin
        print(f"{args.node} was learned by an ancestor: {through.runs[0]} (first in its step {origin.first_step})")
        print(
            f"exact: replay {through.runs[0]} from "
            f"{origin.fork_checkpoint.name if origin.fork_checkpoint else 'its initial weights'} without it, then train "
            f"again, each from its new parent: {', '.join(str(r) for r in through.runs[1:])}"
        )
        print(f"ablation: {origin.ablation}, if no run since let the class or another class out of those parameters")
        return 0
    plan = plan_deletion(args.run_dir, args.node)
    if args.json:
        print(json.dumps(plan.describe(), indent=1))
        return 0
    if plan.first_step is None:
        print(f"{args.node}: never contributed to a step of {args.run_dir}; forgetting it is a no-op")
    else:
        start = (
            f"checkpoint {plan.fork_checkpoint.name} (after step {plan.fork_step})"
            if plan.fork_checkpoint
            else "the initial weights (the class is there from the first steps, or no earlier checkpoint)"
        )
        print(
            f"{args.node} ({counted(len(plan.classes), 'class')}) first contributed in step {plan.first_step} of "
            f"{plan.total_steps}"
        )
        print(
            f"exact: restart from {start}, replay {plan.steps_to_replay} steps "
            f"(~{plan.cost_ratio:.0%} of a full retrain)"
        )
    print(f"ablation: {plan.ablation}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from smalti.checkpoint import CheckpointStore
    from smalti.workflows.deletion import DeletionError, loss_by_class

    latest = CheckpointStore(args.run_dir / "checkpoints", keep=1).latest()
    if latest is None or not (args.run_dir / "recipe.yaml").is_file():
        raise DeletionError(f"{args.run_dir}: not a run directory with a checkpoint")
    losses = loss_by_class(args.run_dir / "recipe.yaml", latest, args.max_samples)
    overall = sum(losses.values()) / max(1, len(losses))
    result = {"checkpoint": latest.name, "mean_class_loss": round(overall, 6)}
    if args.by_class:
        result["by_class"] = losses
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{args.run_dir} @ {latest.name}: mean per-class held-out loss {overall:.4f}")
    for name, loss in losses.items() if args.by_class else ():
        print(f"  {name:40s} {loss:.4f}")
    return 0


def run_eval_forget(args: argparse.Namespace) -> int:
    from smalti.errors import SmaltiError
    from smalti.extras import require

    require("eval", "smalti eval-forget", "scipy", "sklearn")
    from smalti.workflows.forget_eval import evaluate_forgetting, plot
    from smalti.io import atomic_write_text

    try:
        ks = tuple(int(k) for k in args.relearn_examples.split(",") if k)
    except ValueError:
        raise SmaltiError(f"--relearn-examples {args.relearn_examples!r}: expected numbers like 16,64,256") from None
    if not ks or min(ks) < 1:
        raise SmaltiError(f"--relearn-examples {args.relearn_examples!r}: expected positive numbers like 16,64,256")
    from smalti.locks import RUN_LOCK, FolderLock

    out = args.out or args.forgotten / "forget-eval"
    with FolderLock(out / RUN_LOCK, f"evaluating the deletion of {args.node} into {out}"):
        result = evaluate_forgetting(
            args.parent,
            args.forgotten,
            args.node,
            args.counterfactual,
            ks,
            args.relearn_steps,
            args.relearn_lr,
            args.max_examples,
            out / "relearning",
            args.checkpoint_every,
        )
        atomic_write_text(out / "forget-eval.json", json.dumps(result, indent=1) + "\n")
        plot(result, out / "relearning.png")
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    quality, mia = result["forget_quality"], result["membership_inference_auc"]
    print(
        f"{result['class']}: held-out loss parent {quality['loss_on_class']['parent']:.4f}, forgotten "
        f"{quality['loss_on_class']['forgotten']:.4f}, counterfactual {quality['loss_on_class']['counterfactual']:.4f}"
    )
    print(
        f"forget quality: KS {quality['ks_statistic']:.4f} (p = {quality['ks_p_value']:.3g}) forgotten vs counterfactual"
    )
    print(
        f"retained utility: other classes' mean loss changed {result['retained_utility']['change_vs_parent']:+.4f} "
        f"vs the parent, {result['retained_utility']['change_vs_counterfactual']:+.4f} vs the counterfactual"
    )
    print(
        f"membership inference AUC: parent {mia['parent']:.3f}, forgotten {mia['forgotten']:.3f}, counterfactual "
        f"{mia['counterfactual']:.3f}"
    )
    for run in result["relearning"]["runs"]:
        steps = run["steps_to_parent_loss"]
        print(
            f"relearning {run['model']:14s} k={run['examples']:<4d} back to the parent's loss in "
            f"{steps if steps is not None else 'more than ' + str(args.relearn_steps)} steps"
        )
    print(f"{out / 'forget-eval.json'}, {out / 'relearning.png'}")
    return 0
