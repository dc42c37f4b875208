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


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "auditor", help="an auditor's client for smalti serve: sign in, runs, verify, proof, audit, access log",
        description="Talk to a smalti serve service as an auditor. Requests are signed (RFC 9421) by --key for the "
                    "service's ORIGIN; proofs are checked here against the trainer key you bring, not one the "
                    "service names.")
    sub = parser.add_subparsers(dest="auditor_command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str, run) -> argparse.ArgumentParser:  # noqa: A002
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("origin", metavar="ORIGIN", help="the service, e.g. https://audit.example or http://127.0.0.1:8700")
        p.add_argument("--key", required=True, help="your auditor private key: a key file or a pkcs11: URI")
        p.add_argument("--tls-ca", type=Path, help="a CA bundle to check the service's certificate with")
        p.set_defaults(run=run)
        return p

    sign_in = command("sign-in", "a one-time code (and link) to sign in to the web UI",
                      "Ask the service for a one-time challenge, sign it here for this origin, and print a sign-in link "
                      "and code, good once, for two minutes. Your private key never enters the browser.", run_sign_in)
    sign_in.add_argument("--open", action="store_true", help="open the link in your browser")
    command("runs", "list the runs and whether the taxonomy's trainer signed each", "List the served runs.", run_runs)
    verify = command("verify", "fetch every entry of a run and check it against its signed checkpoint",
                     "Fetch the run's checkpoint and check its signature under --trainer-key; fetch every entry as "
                     "tlog-tiles bundles, check their chain, and check they hash to the signed root.", run_verify)
    verify.add_argument("run_name", metavar="RUN")
    verify.add_argument("--trainer-key", type=Path, required=True, help="the trainer's public key, from the trainer")
    proof = command("proof", "prove one step's entry into the signed checkpoint, and show it",
                    "Fetch the step's entry and its inclusion proof, and check both here.", run_proof)
    proof.add_argument("run_name", metavar="RUN")
    proof.add_argument("--step", type=int, required=True)
    proof.add_argument("--trainer-key", type=Path, required=True, help="the trainer's public key, from the trainer")
    audit = command("audit", "ask the service which layers a class reached, or which classes a layer learned from",
                    "The service's answer to a forensic query, as JSON (computed by the service from the ledger; "
                    "use verify to check the ledger itself).", run_audit)
    audit.add_argument("run_name", metavar="RUN")
    what = audit.add_mutually_exclusive_group(required=True)
    what.add_argument("--class", dest="class_name", metavar="CLASS")
    what.add_argument("--layer")
    log = command("access-log", "the service's access log: its signed checkpoint and last records",
                  "Print the access log's signed checkpoint and its last records, as JSON.", run_access_log)
    log.add_argument("--last", type=int, default=20)


def _client(args: argparse.Namespace):
    from smalti.governance.keys import SigningKey
    from smalti.serve.client import AuditClient

    return AuditClient(args.origin, SigningKey.load(args.key), tls_verify=str(args.tls_ca) if args.tls_ca else True)


def _trainer(args: argparse.Namespace):
    from smalti.governance.keys import PublicKey

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
    runs = _client(args).json("/api/runs")
    for run in runs:
        trust = run.get("trust") or {}
        print(f"{run['run']:<32} {run['entries']:>7} entries  {'final' if run['final'] else 'in progress':<11}  "
              f"{'trusted' if trust.get('trusted') else 'NOT TRUSTED: ' + str(trust.get('reason'))}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    checkpoint = _client(args).verify_entries(args.run_name, _trainer(args))
    print(f"{args.run_name}: all {checkpoint.size} entries chain and hash to the root the trainer signed "
          f"({checkpoint.origin}, final {checkpoint.extension('final')})")
    return 0


def run_proof(args: argparse.Namespace) -> int:
    body = _client(args).verify_inclusion(args.run_name, args.step, _trainer(args))
    shown = {k: body[k] for k in ("step", "loss", "counts", "skipped") if k in body}
    print(f"{args.run_name}: step {args.step}'s entry is in the tree the trainer signed")
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
