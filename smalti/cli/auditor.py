"""``smalti auditor``: an auditor's side of ``smalti serve``: sign in to the web UI, list runs, verify, prove, ask.

Every command signs its requests with the auditor's key (a file or a PKCS#11 URI) for the service's origin,
and checks what it is told against the trainer key the auditor brings (``--trainer-key``), never against a key
the service names.
"""

from __future__ import annotations

import argparse
import json
import sys
import webbrowser
from pathlib import Path
from typing import Any, cast


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "auditor",
        help="an auditor's client for smalti serve: sign in, runs, verify, proof, audit, access log",
        description="Talk to a smalti serve service as an auditor. Requests are signed (RFC 9421) by --key for the "
        "service's ORIGIN; proofs are checked here against the trainer key you bring, not one the "
        "service names.",
    )
    sub = parser.add_subparsers(dest="auditor_command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, run) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument(
            "origin", metavar="ORIGIN", help="the service, e.g. https://audit.example or http://127.0.0.1:8700"
        )
        p.add_argument("--key", required=True, help="your auditor private key: a key file or a pkcs11: URI")
        p.add_argument("--tls-ca", type=Path, help="a CA bundle to check the service's certificate with")
        p.set_defaults(run=run)
        return p

    sign_in = command(
        "sign-in",
        "a one-time code (and link) to sign in to the web UI",
        "Ask the service for a one-time challenge, sign it here for this origin, and print a sign-in link "
        "and code, good once, for two minutes. Your private key never enters the browser.",
        run_sign_in,
    )
    sign_in.add_argument("--open", action="store_true", help="open the link in your browser")
    command("runs", "list the runs and whether the taxonomy's trainer signed each", "List the served runs.", run_runs)
    verify = command(
        "verify",
        "fetch every entry of a run and check it against its signed checkpoint",
        "Fetch the run's checkpoint and check its signature under --trainer-key; fetch every entry as "
        "tlog-tiles bundles, check their chain, and check they hash to the signed root.",
        run_verify,
    )
    verify.add_argument("run_name", metavar="RUN")
    verify.add_argument("--trainer-key", type=Path, required=True, help="the trainer's public key, from the trainer")
    _history_options(verify)
    proof = command(
        "proof",
        "prove one step's entry into the signed checkpoint, and show it",
        "Fetch the step's entry and its inclusion proof, and check both here.",
        run_proof,
    )
    proof.add_argument("run_name", metavar="RUN")
    proof.add_argument("--step", type=int, required=True)
    proof.add_argument("--trainer-key", type=Path, required=True, help="the trainer's public key, from the trainer")
    _history_options(proof)
    audit = command(
        "audit",
        "ask the service which layers a class reached, or which classes a layer learned from",
        "The service's answer to a forensic query, as JSON (computed by the service from the ledger; "
        "use verify to check the ledger itself).",
        run_audit,
    )
    audit.add_argument("run_name", metavar="RUN")
    what = audit.add_mutually_exclusive_group(required=True)
    what.add_argument("--class", dest="class_name", metavar="CLASS")
    what.add_argument("--layer")
    log = command(
        "access-log",
        "the service's access log: its signed checkpoint and last records",
        "Print the access log's signed checkpoint and its last records, as JSON.",
        run_access_log,
    )
    log.add_argument("--last", type=int, default=20)


def _history_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log",
        metavar="ORIGIN",
        help="the run's log name as the trainer told you (smalti ledger checkpoint RUN prints it "
        "first); a log of another run signed by the same trainer is refused",
    )
    parser.add_argument(
        "--state",
        type=Path,
        metavar="DIR",
        help="a folder of yours where the last checkpoint verified for each run is kept: the next "
        "one must be the same log and extend it (a consistency proof checked here), so a cut "
        "or rewritten history is caught",
    )


def _checkpoint(client, args: argparse.Namespace):
    """The run's checkpoint, checked under the trainer key (and the log's name and history, where given)."""
    checkpoint = client.verified_checkpoint(args.run_name, _trainer(args), args.log)
    history = client.check_history(args.run_name, checkpoint, args.state) if args.state else None
    return checkpoint, history


def _client(args: argparse.Namespace):
    from smalti.trust.keys import SigningKey
    from smalti.serve.client import AuditClient

    return AuditClient(args.origin, SigningKey.load(args.key), tls_verify=str(args.tls_ca) if args.tls_ca else True)


def _trainer(args: argparse.Namespace):
    from smalti.trust.keys import PublicKey

    return PublicKey.load(args.trainer_key)


def run_sign_in(args: argparse.Namespace) -> int:
    client = _client(args)
    code = client.sign_in_code()
    link = f"{client.origin}/ui/#code={code}"
    print(f"sign-in link (good once, for two minutes):\n{link}\nor paste this code into the page:\n{code}")
    if args.open:
        webbrowser.open(link)
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from smalti.serve.client import RemoteError, printable

    runs = _client(args).json("/api/runs")
    if not isinstance(runs, list):
        raise RemoteError(f"{args.origin}/api/runs: not a list of runs")
    for run in runs:
        if not isinstance(run, dict):
            raise RemoteError(f"{args.origin}/api/runs: an entry of the list is not a run")
        trust = cast(dict[str, Any], run.get("trust")) if isinstance(run.get("trust"), dict) else {}
        state = "final" if run.get("final") else "in progress"
        verdict = "trusted" if trust.get("trusted") is True else "NOT TRUSTED: " + printable(trust.get("reason"))
        print(
            f"{printable(run.get('run'), 64):<32} {printable(run.get('entries'), 12):>7} entries  {state:<11}  "
            f"{verdict}"
        )
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from smalti.serve.client import printable

    client = _client(args)
    checkpoint, history = _checkpoint(client, args)
    client.verify_entries(args.run_name, _trainer(args), checkpoint)
    print(
        f"{printable(args.run_name)}: all {checkpoint.size} entries chain and hash to the root the trainer signed "
        f"(log {printable(checkpoint.origin)}, final {printable(checkpoint.extension('final'))})"
        + (f"; {history}" if history else "")
    )
    return 0


def run_proof(args: argparse.Namespace) -> int:
    from smalti.serve.client import printable

    client = _client(args)
    checkpoint, history = _checkpoint(client, args)
    body = client.verify_inclusion(args.run_name, args.step, _trainer(args), checkpoint)
    shown = {k: body[k] for k in ("step", "loss", "counts", "skipped") if k in body}
    print(
        f"{printable(args.run_name)}: step {args.step}'s entry is in the tree the trainer signed (log "
        f"{printable(checkpoint.origin)} at size {checkpoint.size})" + (f"; {history}" if history else "")
    )
    json.dump(shown, sys.stdout, indent=1)
    print()
    return 0


def run_audit(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.class_name is not None:
        answer = client.json(f"/api/runs/{args.run_name}/audit/class", name=args.class_name)
    else:
        answer = client.json(f"/api/runs/{args.run_name}/audit/layer", name=args.layer)
    json.dump(answer, sys.stdout, indent=1)
    print()
    return 0


def run_access_log(args: argparse.Namespace) -> int:
    json.dump(_client(args).json("/api/access-log", last=args.last), sys.stdout, indent=1)
    print()
    return 0
