"""``smalti keys new``, ``smalti sign``, ``smalti verify``: Ed25519 keys and detached signatures."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.trust.keys import (
    PublicKey,
    SigningKey,
    read_signature,
    sign_bytes,
    signature_path,
    verify_bytes,
    write_key_pair,
)
from smalti.errors import SmaltiError
from smalti.io import atomic_write_text


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    keys = subparsers.add_parser(
        "keys",
        help="make Ed25519 key pairs for authorities",
        description="Key pairs for the authorities: data-governance, tagging, model-risk, trainer.",
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    new = keys_sub.add_parser(
        "new",
        help="make a key pair",
        description="Write NAME.key (private, PKCS#8 PEM, mode 0600) and NAME.pub (one line 'ed25519:<base64>') "
        "into DIR. Never overwrites an existing key.",
    )
    new.add_argument("name", help="the key's name, e.g. data-governance")
    new.add_argument("--dir", type=Path, required=True, help="folder for the key files")
    new.add_argument(
        "--type",
        dest="kind",
        choices=("ed25519", "ecdsa-p256"),
        default="ed25519",
        help="ed25519 (default; every Smalti signature) or ecdsa-p256 (OpenSSF model signing: smalti "
        "export --sign --model-key; its .pub is PEM)",
    )
    new.add_argument(
        "--in",
        dest="token_uri",
        metavar="PKCS11_URI",
        help="make the key pair inside a PKCS#11 token "
        "(pkcs11:token=LABEL;object=NAME, RFC 7512; PIN from pin-value or SMALTI_PKCS11_PIN): only "
        "NAME.pub is written, and the URI is what --key takes from then on",
    )
    new.set_defaults(run=run_new)

    note = keys_sub.add_parser(
        "note-key",
        help="print a public key as a C2SP signed-note verifier key",
        description="Print name+keyid+base64(0x01||key), the verifier key format of C2SP signed notes, which Go's "
        "sumdb note package, witnesses and tlog clients read. The name is part of the key ID: a run's "
        "tree heads are signed under its ledger origin (smalti ledger checkpoint RUN --verifier-key "
        "prints that run's).",
    )
    note.add_argument("pubkey", type=Path, metavar="PUBKEY", help="public key file (NAME.pub)")
    note.add_argument("--name", required=True, help="the key name, e.g. a ledger origin example.org/smalti/RUN_ID")
    note.set_defaults(run=run_note_key)

    sign = subparsers.add_parser(
        "sign",
        help="write a detached signature FILE.sig",
        description="Sign the exact bytes of FILE with a private key; writes FILE.sig (JSON).",
    )
    sign.add_argument("file", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private key file (NAME.key)")
    sign.set_defaults(run=run_sign)

    verify = subparsers.add_parser(
        "verify",
        help="check FILE.sig against a public key",
        description="Exit 0 if FILE.sig is a valid signature of FILE by the given public key.",
    )
    verify.add_argument("file", type=Path)
    verify.add_argument("--pubkey", type=Path, required=True, help="public key file (NAME.pub)")
    verify.set_defaults(run=run_verify)


def run_new(args: argparse.Namespace) -> int:
    if args.token_uri:
        from smalti.trust.pkcs11 import generate

        path = args.dir / f"{args.name}.pub"
        if path.exists():
            raise SmaltiError(f"{path}: already exists; refusing to overwrite a key")
        public_key = generate(args.token_uri, args.kind)
        args.dir.mkdir(parents=True, exist_ok=True)
        if isinstance(public_key, str):  # ECDSA P-256 for model signing: PEM, as model_signing reads it
            atomic_write_text(path, public_key)
            print(f"{args.token_uri}  (private, in the token)\n{path}  ECDSA P-256, PEM")
            return 0
        atomic_write_text(path, f"# {args.name} (key id {public_key.key_id}, in {args.token_uri})\n{public_key.text}\n")
        print(f"{args.token_uri}  (private, in the token)\n{path}  key id {public_key.key_id}")
        return 0
    private, public = write_key_pair(args.name, args.dir, args.kind)
    described = f"key id {PublicKey.load(public).key_id}" if args.kind == "ed25519" else "ECDSA P-256, PEM"
    print(f"{private}  (private, keep secret)\n{public}  {described}")
    return 0


def run_note_key(args: argparse.Namespace) -> int:
    from smalti.trust.note import verifier_key

    print(verifier_key(args.name, PublicKey.load(args.pubkey).raw))
    return 0


def run_sign(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SmaltiError(f"{args.file}: file not found")
    key = SigningKey.load(args.key)
    out = signature_path(args.file)
    atomic_write_text(out, sign_bytes(args.file.read_bytes(), key).to_json())
    print(f"{out}  signed by key {key.public.key_id}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SmaltiError(f"{args.file}: file not found")
    public = PublicKey.load(args.pubkey)
    verify_bytes(args.file.read_bytes(), read_signature(args.file), public, where=str(args.file))
    print(f"{args.file}: good signature by key {public.key_id}")
    return 0
