"""``smalti audit``: forensic questions to a run's ledger, and the HTML report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console

from smalti.cli.output import add_columns, console as output_console, counted, table as new_table
from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit",
        help="which classes reached which layers, when; the HTML audit report",
        description="Answer from the run's ledger (verified first): --layer L: which classes contributed to layer L "
        "and how much; --class C: which layers class C (or any class under node C) touched and in "
        "which steps; --example ID: which steps and layers an example contributed to; --param NAME: "
        "as --layer for the parameter's layer; --report FILE: a self-contained HTML report. Without a "
        "question: a summary of every class. For a run with a lineage (a fine-tune, a deletion), --layer, "
        "--class and --param also answer for every ancestor's steps, marked as inherited, once the chain "
        "verifies.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    question = parser.add_mutually_exclusive_group()
    question.add_argument("--layer", help="a layer (module) name, e.g. blocks.0.attn.qkv")
    question.add_argument("--class", dest="class_name", help="a class or taxonomy node, e.g. gutenberg/history")
    question.add_argument(
        "--example",
        help="an example: its dataset id (e.g. tempest/train/000925, as errors name "
        "it) or its index in the training split",
    )
    question.add_argument("--param", help="a parameter name, e.g. tok_emb.weight")
    question.add_argument("--report", type=Path, metavar="FILE", help="write the HTML audit report here")
    parser.add_argument("--pubkey", type=Path, help="trainer public key to verify the ledger against")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.audit import AuditError, Ledger, training_index
    from smalti.governance.ledger.verify import verify_ledger

    verified = verify_ledger(args.run_dir, PublicKey.load(args.pubkey) if args.pubkey else None)
    console = output_console()  # names are never cut, in a terminal or not
    if args.report is not None:
        from smalti.workflows.report import write_report

        path = write_report(args.run_dir, args.report, verified)
        console.print(f"audit report: {path.resolve()}")
        return 0 if verified.ok else 1
    if not verified.ok:
        raise SmaltiError(
            f"{args.run_dir}: the ledger failed verification, its answers cannot be trusted ({verified.problem})"
        )
    ledger = Ledger.load(args.run_dir)
    try:
        if args.layer is not None or args.param is not None:
            answer = ledger.layer(args.layer) if args.layer is not None else ledger.parameter(args.param)
        elif args.class_name is not None:
            answer = ledger.for_class(args.class_name)
        elif args.example is not None:
            index = training_index(args.run_dir, args.example)
            answer = ledger.example(index, None if args.example.isdigit() else args.example)
        else:
            answer = {"classes": {c: len(ledger.for_class(c)["layers_touched"]) for c in ledger.run["classes"]}}
    except AuditError as error:
        raise SmaltiError(str(error)) from None
    inherited = _inherited(args) if args.example is None else []
    if args.json:
        print(json.dumps({**answer, "inherited": inherited}, indent=1))
        return 0
    if ledger.steps or not inherited:
        _print(console, answer, len(ledger.layer_names))
    else:  # an ablation: no steps of its own, so its own table would be empty
        console.print(
            f"{args.run_dir} has no training steps of its own (it is a deletion by ablation of its "
            f"parent's weights); what its lineage taught:",
            highlight=False,
        )
    for part in inherited:
        console.print(
            f"\ninherited from {part['run_dir']} ({part['link']} link, its steps up to {part['up_to_step']}):",
            highlight=False,
        )
        if "answer" in part:
            _print(console, part["answer"], part["layers"])
        else:
            console.print(f"  {part['not_applicable']}", highlight=False)
    return 0


def _inherited(args: argparse.Namespace) -> list[dict]:
    """The same question to every ancestor's ledger, up to the head its child starts from (chain verified)."""
    from smalti.governance.ledger.audit import AuditError, Ledger
    from smalti.governance.lineage import chain, verify_chain

    links = chain(args.run_dir)
    if not links:
        return []
    problem = verify_chain(args.run_dir)
    if problem is not None:
        raise SmaltiError(
            f"{args.run_dir}: its lineage does not verify, inherited answers cannot be trusted ({problem})"
        )
    found = []
    for parent, link in links:
        ledger = Ledger.load(parent)
        ledger.steps = ledger.steps[: int(link.head["size"]) - 1]  # entry 0 is the run entry
        part = {
            "run_dir": str(parent),
            "link": link.kind,
            "up_to_step": ledger.steps[-1]["step"] if ledger.steps else 0,
            "layers": len(ledger.layer_names),
        }
        try:
            if args.layer is not None or args.param is not None:
                name = args.layer if args.layer is not None else None
                if name is not None and name not in ledger.layer_names:
                    name = name.replace(".base_layer", "")  # a LoRA-wrapped layer is the plain one in its parent
                if name is None:
                    known = {p for layer in ledger.run["layers"] for p in layer["parameters"]}
                    param = args.param if args.param in known else args.param.replace(".base_layer.", ".")
                part["answer"] = ledger.layer(name) if name is not None else ledger.parameter(param)
            elif args.class_name is not None:
                part["answer"] = ledger.for_class(args.class_name)
            else:
                part["answer"] = {
                    "classes": {c: len(ledger.for_class(c)["layers_touched"]) for c in ledger.run["classes"]}
                }
        except AuditError as error:
            part["not_applicable"] = str(error)
        found.append(part)
    return found


def _print(console: Console, answer: dict, n_layers: int) -> None:
    if "layer" in answer:
        table = new_table(f"layer {answer['layer']}: updated in {answer['updated_summary']}")
        add_columns(table, "class", "steps", "sum of gradient norms", "share of the layer's learning")
        for name, row in answer["classes"].items():
            table.add_row(name, str(row["steps"]), f"{row['norm_sum']:.4g}", f"{100 * row['share_of_total']:.1f}%")
        console.print(table)
    elif "class" in answer:
        table = new_table(
            f"{answer['class']}: {counted(answer['examples_seen'], 'example')} in "
            f"{answer['steps_present_summary']}; touched {len(answer['layers_touched'])} of "
            f"{counted(n_layers, 'layer')}"
        )
        add_columns(table, "layer", "steps", "when")
        for name, row in answer["layers_touched"].items():
            when = "every step it was in" if row["whenever_present"] else row["summary"]
            table.add_row(name, str(row["steps"]), when)
        console.print(table)
        if answer["layers_never_touched"]:
            console.print("never touched: " + ", ".join(answer["layers_never_touched"]), highlight=False)
        if "experts_reached" in answer:
            experts = new_table(f"{answer['class']}: the experts its tokens were routed to")
            add_columns(experts, "layer of experts", "experts reached", "tokens per expert")
            for layer, row in answer["experts_reached"].items():
                reached = ", ".join(str(e) for e in row["experts"]) or "none"
                experts.add_row(layer, reached, " ".join(str(n) for n in row["tokens"]))
            console.print(experts)
    elif "example" in answer:
        named = f"{answer['id']} (training example {answer['example']})" if answer["id"] else answer["example"]
        console.print(
            f"example {named}: in steps {answer['steps'] or 'none'}"
            + (
                f"; dropped (did not contribute) in steps {answer['dropped_in_steps']}"
                if answer["dropped_in_steps"]
                else ""
            )
        )
        for row in answer["appearances"]:
            console.print(
                f"  step {row['step']} as {'+'.join(row['classes'])}: {len(row['layers'])} layers "
                f"({', '.join(row['layers'])})"
            )
    else:
        table = new_table("layers touched per class")
        add_columns(table, "class", "layers")
        for name, count in answer["classes"].items():
            table.add_row(name, str(count))
        console.print(table)
