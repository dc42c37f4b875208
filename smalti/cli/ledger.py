"""``smalti ledger``: verify, show, prove and export a run's learning-dynamics ledger."""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

from smalti.cli.arguments import at_least_one
from smalti.cli.output import counted
from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ledger",
        help="verify, show, prove and export a run's ledger",
        description="The ledger holds one entry per optimizer step (RFC 6962 Merkle tree, Ed25519-signed tree heads "
        "by the trainer key) in RUN_DIR/ledger.sqlite.",
    )
    sub = parser.add_subparsers(dest="ledger_command", metavar="COMMAND", required=True)

    _add_reading_commands(sub)
    _add_publishing_commands(sub)


def _add_reading_commands(sub: argparse._SubParsersAction) -> None:
    verify = sub.add_parser(
        "verify",
        help="recompute every leaf, the tree and every signed tree head",
        description="Exit 0 only if every entry hashes to its leaf, the index sequence and hash chain are unbroken, "
        "every signed tree head's root matches the entries and its signature is the trainer key's, "
        "every entry is covered by a head and the last head is final. Otherwise name the first bad "
        "place and exit 1.",
    )
    verify.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    verify.add_argument(
        "--pubkey",
        type=Path,
        help="the trainer authority's public key (default: the key the "
        "ledger records, which proves integrity but not who signed)",
    )
    verify.add_argument(
        "--deep", action="store_true", help="also parse every entry (canonical form, step order); runs in one process"
    )
    verify.add_argument(
        "--witness",
        type=Path,
        action="append",
        default=[],
        metavar="WITNESS.pub",
        help="also require a cosignature by this witness (smalti witness cosign) on a checkpoint of "
        "this ledger, read from --cosigned (repeatable: every witness named must have cosigned)",
    )
    verify.add_argument(
        "--cosigned",
        metavar="FILE_OR_URL",
        help="the cosigned checkpoint: a file, or a published "
        "log's URL (its checkpoint); default: the recipe's governance.ledger.publish URL",
    )
    verify.add_argument(
        "--workers",
        type=at_least_one,
        default=None,
        metavar="N",
        help="processes reading and hashing the ledger in spans of 8,192 entries (default: one per "
        "core; 1 checks in this process alone)",
    )
    verify.set_defaults(run=run_verify)
    show = sub.add_parser(
        "show",
        help="print entries (a summary per step, or one step whole)",
        description="Without --step: one line per step. With --step N: that step's entry whole.",
    )
    show.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    show.add_argument("--step", type=int, help="show this step's entry whole")
    show.add_argument("--json", action="store_true", help="print JSON (one object per line without --step)")
    show.set_defaults(run=run_show)
    proof = sub.add_parser(
        "proof",
        help="an inclusion proof for one step, as JSON checkable without Smalti",
        description="Print the step's entry (base64), its leaf hash SHA-256(0x00||entry), the RFC 6962 audit path "
        "to the last signed tree head, and that head with its Ed25519 signature.",
    )
    proof.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    proof.add_argument("--step", type=int, required=True)
    proof.set_defaults(run=run_proof)


def _add_publishing_commands(sub: argparse._SubParsersAction) -> None:
    checkpoint = sub.add_parser(
        "checkpoint",
        help="the latest signed tree head as a C2SP checkpoint (signed note), and its verifier key",
        description="Print the run's latest signed tree head in the transparency-log world's format: a C2SP "
        "tlog-checkpoint (origin LOG_NAME/RUN_ID, size, base64 root hash, smalti- extension lines) "
        "in a C2SP signed note, signed by the trainer key under the origin's name. Any note verifier "
        "(Go's golang.org/x/mod/sumdb/note, witnesses) checks it with the verifier key "
        "(--verifier-key prints it: name+keyid+base64key).",
    )
    checkpoint.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    checkpoint.add_argument("--size", type=at_least_one, help="the head at this tree size (default: the latest)")
    checkpoint.add_argument("--verifier-key", action="store_true", help="print the run's note verifier key instead")
    checkpoint.set_defaults(run=run_checkpoint)
    publish = sub.add_parser(
        "publish",
        help="publish the ledger as a C2SP tlog-tiles log to a folder or any fsspec URL",
        description="Write RUN_DIR's ledger, up to its latest signed tree head, as a C2SP tlog-tiles log under URL "
        "(a folder, file://, s3://, or an HTTP server that accepts PUT): checkpoint, the hash tiles "
        "tile/L/N[.p/W] and the entry bundles tile/entries/N[.p/W]. Append-only and incremental: what URL "
        "already holds must be a prefix of this ledger (else nothing is written), only new tiles are "
        "written, a full tile never twice, and the checkpoint last. Any static file server then serves "
        "a log that tlog clients and witnesses can check (smalti witness cosign).",
    )
    publish.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    publish.add_argument("--to", required=True, metavar="URL", help="where the log lives, e.g. s3://bucket/logs/run1")
    publish.add_argument(
        "--storage-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an fsspec option for URL, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable)",
    )
    publish.set_defaults(run=run_publish)
    export = sub.add_parser(
        "export",
        help="write every entry as JSON lines or Parquet",
        description="One row per entry: index, step, leaf hash (hex) and the decoded entry.",
    )
    export.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    export.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    export.add_argument("--out", type=Path, help="output file (default: RUN_DIR/ledger.FORMAT)")
    export.set_defaults(run=run_export)


def run_verify(args: argparse.Namespace) -> int:
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.verify import verify_ledger

    from smalti.workflows.certificate import CERTIFICATE, verify_certificate

    key = PublicKey.load(args.pubkey) if args.pubkey else None
    certificate = args.run_dir / CERTIFICATE
    if certificate.is_file():  # a run made by `smalti forget`: the certificate, the parent and this ledger
        problem = verify_certificate(args.run_dir, key)
        if problem is not None:
            print(f"deletion certificate FAILED verification: {problem}", file=sys.stderr)
            return 1
        print(f"deletion certificate OK: {certificate}")
        if not (args.run_dir / "ledger.sqlite").is_file():
            return 0
    report = verify_ledger(args.run_dir, key, deep=args.deep, workers=args.workers)
    if not report.ok:
        print(f"ledger FAILED verification: {report.problem}", file=sys.stderr)
        return 1
    head = report.last_head
    assert head is not None  # a verified ledger has a last signed head
    from smalti.cli.output import counted

    print(
        f"ledger OK: {counted(report.entries, 'entry', 'entries')}, {counted(report.heads, 'signed tree head')}; "
        f"final root {head['root']} "
        f"(size {head['size']}, signed {head['timestamp']} by key {report.key_id})"
    )
    if args.pubkey is None:
        print(f"note: checked against {report.key_source}")
    from smalti.governance.lineage import chain, verify_chain

    links = chain(args.run_dir)
    if links:  # every link behind the run: each parent's ledger, the head its child names, the weights
        notes: list[str] = []
        problem = verify_chain(args.run_dir, notes)
        if problem is not None:
            print(f"lineage FAILED verification: {problem}", file=sys.stderr)
            return 1
        described = " <- ".join(f"{parent} ({link.kind})" for parent, link in links)
        print(f"lineage OK: {args.run_dir} <- {described}")
        for note in notes:
            print(f"note: {note}")
    if args.witness:
        problem = _check_witnesses(args)
        if problem is not None:
            print(f"witness FAILED verification: {problem}", file=sys.stderr)
            return 1
    return 0


def _check_witnesses(args: argparse.Namespace) -> str | None:
    """Every --witness must have cosigned a checkpoint of this ledger; None, or what is wrong."""
    from smalti.config import load_recipe
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.tiles import PublishedLog, PublishError
    from smalti.workflows.witness import WitnessError, check_witnessed

    source = args.cosigned
    if source is None and (args.run_dir / "recipe.yaml").is_file():
        source = load_recipe(args.run_dir / "recipe.yaml").governance.ledger.publish
    if source is None:
        return "--witness needs --cosigned FILE_OR_URL (the run's recipe publishes nowhere)"
    try:
        note = (
            Path(source).read_text(encoding="utf-8")
            if Path(source).is_file()
            else (PublishedLog(source).read("checkpoint").decode("utf-8"))
        )
        for path in args.witness:
            print(f"witness OK: {check_witnessed(args.run_dir, note, PublicKey.load(path))} ({path})")
    except (WitnessError, PublishError, UnicodeDecodeError, OSError) as error:
        return str(error)
    return None


def _load_step(run_dir: Path, step: int) -> tuple[int, bytes, bytes]:
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    store = LedgerStore(ledger_path(run_dir))
    try:
        found = store.entry_at_step(step)
    finally:
        store.close()
    if found is None:
        raise SmaltiError(f"{run_dir}: the ledger has no entry for step {step}")
    return found


def run_show(args: argparse.Namespace) -> int:
    from smalti.governance.ledger.audit import Ledger
    from smalti.trust.entry import decode_entry

    if args.step is not None:
        index, leaf, data = _load_step(args.run_dir, args.step)
        body = decode_entry(data).body
        print(json.dumps({"index": index, "leaf": leaf.hex(), "entry": body}, indent=None if args.json else 1))
        return 0
    ledger = Ledger.load(args.run_dir)
    names = ledger.layer_names
    for entry in ledger.steps:
        updated = sum(layer[0] for layer in entry["layers"])
        if args.json:
            print(
                json.dumps(
                    {
                        "step": entry["step"],
                        "loss": entry["loss"],
                        "counts": entry["counts"],
                        "updated_layers": updated,
                        "dropped": len(entry["dropped"]),
                    }
                )
            )
        else:
            counts = ", ".join(f"{c.rsplit('/', 1)[-1]}={n}" for c, n in entry["counts"].items())
            print(
                f"step {entry['step']:>6}  loss {entry['loss']:.4f}  layers updated {updated}/{len(names)}  "
                f"{counts}" + (f"  dropped {len(entry['dropped'])}" if entry["dropped"] else "")
            )
    return 0


def run_proof(args: argparse.Namespace) -> int:
    from smalti.trust import merkle
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    index, leaf, data = _load_step(args.run_dir, args.step)
    store = LedgerStore(ledger_path(args.run_dir))
    try:
        heads = [h for h in store.heads() if h.size > index]
        if not heads:
            raise SmaltiError(f"{args.run_dir}: no signed tree head covers step {args.step} yet")
        head = heads[-1]
        leaves = store.leaves(stop=head.size)
    finally:
        store.close()
    proof = merkle.inclusion_proof(index, leaves)
    print(
        json.dumps(
            {
                "step": args.step,
                "leaf_index": index,
                "tree_size": head.size,
                "entry_base64": base64.b64encode(data).decode(),
                "leaf_hash": merkle.leaf_hash(data).hex(),
                "audit_path": [p.hex() for p in proof],
                "tree_head": head.to_json(),
                "how_to_check": "leaf = SHA-256(0x00 || entry); fold the audit path as RFC 9162 section 2.1.3.2; the result "
                "must equal tree_head.root; tree_head.signature is Ed25519 over tree_head.message (a C2SP "
                "checkpoint; smalti ledger checkpoint RUN prints it as a signed note)",
            },
            indent=1,
        )
    )
    return 0


def run_checkpoint(args: argparse.Namespace) -> int:
    from smalti.trust.note import verifier_key
    from smalti.governance.ledger.store import LedgerStore, ledger_path

    if not ledger_path(args.run_dir).is_file():
        raise SmaltiError(f"{args.run_dir}: no ledger here (ledger.sqlite)")
    store = LedgerStore(ledger_path(args.run_dir))
    try:
        heads, origin, public = store.heads(), store.origin, store.trainer_key.raw
    finally:
        store.close()
    if args.verifier_key:
        print(verifier_key(origin, public))
        return 0
    chosen = [h for h in heads if args.size is None or h.size == args.size]
    if not chosen:
        raise SmaltiError(f"{args.run_dir}: no signed tree head" + (f" at size {args.size}" if args.size else ""))
    sys.stdout.write(chosen[-1].note(public))
    return 0


def storage_options(pairs: list[str]) -> dict[str, object]:
    """``--storage-option KEY=VALUE`` pairs; values read as YAML scalars (true, 3, a string)."""
    import yaml

    options: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SmaltiError(f"--storage-option {pair!r}: expected KEY=VALUE")
        if "." in key:  # nested: client_kwargs.endpoint_url=...
            outer, _, inner = key.partition(".")
            options.setdefault(outer, {})[inner] = yaml.safe_load(value)  # type: ignore[index]
        else:
            options[key] = yaml.safe_load(value)
    return options


def run_publish(args: argparse.Namespace) -> int:
    from smalti.governance.ledger.tiles import publish

    if not (args.run_dir / "ledger.sqlite").is_file():
        raise SmaltiError(f"{args.run_dir}: no ledger here (ledger.sqlite)")
    done = publish(args.run_dir, args.to, storage_options(args.storage_option))
    print(
        f"published {args.run_dir} to {args.to}: tree size {done.size} (was {done.previous_size}), "
        f"{counted(done.written, 'tile')} written"
    )
    return 0


def run_export(args: argparse.Namespace) -> int:
    from smalti.trust.entry import decode_entry
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.io import atomic_write_bytes

    out = args.out or args.run_dir / f"ledger.{args.format}"
    store = LedgerStore(ledger_path(args.run_dir))
    try:
        rows = [
            {"index": index, "step": step, "leaf": leaf.hex(), "entry": decode_entry(data).body}
            for index, step, leaf, data in store.rows()
        ]
    finally:
        store.close()
    if args.format == "jsonl":
        atomic_write_bytes(out, "".join(json.dumps(row) + "\n" for row in rows).encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "index": [r["index"] for r in rows],
                "step": [r["step"] for r in rows],
                "leaf": [r["leaf"] for r in rows],
                "entry": [json.dumps(r["entry"]) for r in rows],
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(out, sink.getvalue().to_pybytes())
    print(f"wrote {counted(len(rows), 'entry', 'entries')} to {out}")
    return 0
