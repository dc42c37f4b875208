"""``smalti admit MODEL_DIR --policy deploy.yaml``: a deployer checks a signed model's record against its policy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "admit",
        help="check a signed model's whole record, then a deploy policy's requirements (CEL); sign a SLSA VSA",
        description="Verify MODEL_DIR (smalti export --sign): its model signature, its provenance, the ledger head "
        "and deletion certificates it carries, and its evaluation attestations (each by a trusted --evaluator, "
        "about these weights). Then evaluate every requirement of --policy, a CEL expression over `model`; list "
        "every one that fails and exit 1, or, with --key, write a SLSA Verification Summary Attestation signed by "
        "the deployer. See docs/closure.md.",
    )
    parser.add_argument("directory", type=Path, help="a signed model folder (smalti export --sign)")
    parser.add_argument("--policy", type=Path, required=True, help="the deploy policy (YAML: admit, requirements)")
    parser.add_argument("--trainer-pubkey", type=Path, required=True, help="the trainer's Ed25519 public key")
    parser.add_argument("--model-pubkey", type=Path, required=True, help="the trainer's model-signing public key")
    parser.add_argument(
        "--evaluator",
        action="append",
        default=[],
        metavar="NAME=PUB",
        help="an evaluator whose attestations count (repeatable)",
    )
    parser.add_argument("--key", help="the deployer's private key: sign a VSA when the model is admitted")
    parser.add_argument("--out", type=Path, help="where to write the VSA (default MODEL_DIR.vsa.intoto.json)")
    parser.add_argument("--facts", action="store_true", help="print the verified facts the policy sees, as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import json

    from smalti.cli.arguments import named_key
    from smalti.io import atomic_write_text
    from smalti.trust.keys import PublicKey, SigningKey
    from smalti.workflows.admission import check, load_policy, model_record, verification_summary

    policy = load_policy(args.policy)
    evaluators = {name: PublicKey.load(pub) for name, pub in (named_key(e, "--evaluator") for e in args.evaluator)}
    key = SigningKey.load(args.key) if args.key else None
    model, inputs = model_record(args.directory, PublicKey.load(args.trainer_pubkey), args.model_pubkey, evaluators)
    if args.facts:
        print(json.dumps(model, indent=1, sort_keys=True))
    failed = check(policy, model)
    for line in failed:
        print(f"smalti: admit: {line}", file=sys.stderr)
    for refused in model["refused"]:
        print(f"smalti: admit: not counted: evaluations/{refused['file']}: {refused['why']}", file=sys.stderr)
    if failed:
        print(
            f"{args.directory}: NOT ADMITTED under {policy.name}: {len(failed)} of {len(policy.requirements)} "
            "requirements failed",
            file=sys.stderr,
        )
        return 1
    print(f"{args.directory}: admitted under {policy.name} ({len(policy.requirements)} requirements hold)")
    if key is not None:
        out = args.out or args.directory.with_name(args.directory.name + ".vsa.intoto.json")
        envelope = verification_summary(args.directory, policy, inputs, model, key)
        atomic_write_text(out, json.dumps(envelope, indent=1) + "\n")
        print(f"signed verification summary: {out}")
    return 0
