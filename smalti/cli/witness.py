"""``smalti witness cosign``: an auditor cosigns a published ledger's checkpoint, if it extends the last one."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "witness",
        help="cosign a published ledger's checkpoint as a witness (C2SP tlog-cosignature)",
        description="An auditor's witness: it remembers, per log, the last checkpoint it cosigned, and cosigns a new "
        "one only if the log's signature holds and the new tree contains the old one (a consistency "
        "proof computed from the log's tiles). A trainer that rewrites history after this witness saw "
        "it never gets its cosignature again.",
    )
    sub = parser.add_subparsers(dest="witness_command", metavar="COMMAND", required=True)
    cosign = sub.add_parser(
        "cosign",
        help="check and cosign the checkpoint at URL",
        description="Fetch URL/checkpoint (a log written by smalti ledger publish), verify it with the log's key, "
        "check it is consistent with the checkpoint this witness last cosigned for that log (kept in "
        "--state), add an Ed25519 C2SP tlog-cosignature, keep the result in --state and write it back to "
        "URL/checkpoint if the log still serves the checkpoint that was checked and accepts writes.",
    )
    cosign.add_argument("url", metavar="URL", help="the published log (folder, s3://, http(s)://)")
    cosign.add_argument("--key", type=Path, required=True, help="the witness's (auditor's) private key")
    cosign.add_argument("--state", type=Path, required=True, help="this witness's state folder")
    cosign.add_argument(
        "--name",
        help="the witness's name in the cosignature line, e.g. auditor.example.org/w1 (default: witness/KEY_ID)",
    )
    cosign.add_argument(
        "--log-key",
        help="the log's verifier key (smalti ledger checkpoint RUN --verifier-key); "
        "needed the first time, kept in --state after that",
    )
    cosign.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for URL (repeatable)",
    )
    cosign.add_argument("--no-write-back", action="store_true", help="do not write the cosigned checkpoint to URL")
    cosign.set_defaults(run=run_cosign)


def run_cosign(args: argparse.Namespace) -> int:
    from smalti.cli.ledger import storage_options
    from smalti.trust.keys import SigningKey
    from smalti.workflows.witness import cosign

    key = SigningKey.load(args.key)
    done = cosign(
        args.url,
        key,
        args.name or f"witness/{key.public.key_id}",
        args.state,
        args.log_key,
        storage_options(args.storage_option),
        write_back=not args.no_write_back,
    )
    since = "first cosignature" if done["previous_size"] is None else f"consistent with size {done['previous_size']}"
    print(
        f"cosigned {done['origin']} at size {done['size']} ({since}); "
        f"{'written back to ' + args.url if done['written_back'] else 'kept in ' + str(args.state)}"
    )
    return 0
