"""``smalti serve``: a read-only HTTP service over a folder of runs, for auditors (docs/auditing.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve runs read-only to auditors (signed requests, RFC 9421)",
        description="Serve every run in RUNS_DIR (runs still training included) over HTTP, read-only: runs and lineage, "
                    "C2SP checkpoints and tlog tiles, entries, inclusion and consistency proofs, the forensic queries, "
                    "entropy profiles, deletion certificates and the HTML report; the JSON API's OpenAPI schema is at "
                    "/openapi.json. Every request must be signed (HTTP Message Signatures, RFC 9421) by a key the "
                    "signed taxonomy names in the auditor role; every access is recorded in an append-only Merkle log.")
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    parser.add_argument("--taxonomy", type=Path, required=True, help="the signed taxonomy naming the auditors")
    parser.add_argument("--trust", type=Path, required=True, help="the data-governance public key that signed it")
    parser.add_argument("--listen", default="127.0.0.1:8700", metavar="HOST:PORT", help="default 127.0.0.1:8700")
    parser.add_argument("--access-log", type=Path, help="the access log (default: RUNS_DIR/.smalti-access.sqlite)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from smalti.governance.keys import PublicKey
    from smalti.governance.taxonomy import Taxonomy

    if not args.runs_dir.is_dir():
        raise SmaltiError(f"{args.runs_dir}: not a folder of runs")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SmaltiError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8700")
    taxonomy = Taxonomy.load(args.taxonomy, PublicKey.load(args.trust))
    if not any(a.role == "auditor" and a.key for a in taxonomy.authorities.values()):
        raise SmaltiError(f"{args.taxonomy}: names no auditor key; nobody could read (add an authority with role "
                          "auditor and its key, and sign the taxonomy again)")
    try:
        import uvicorn

        from smalti.serve.app import create_app
    except ImportError:
        raise SmaltiError("smalti serve needs the serve extra: pip install 'smalti[serve]'") from None
    app = create_app(args.runs_dir, taxonomy, args.access_log or args.runs_dir / ".smalti-access.sqlite")
    print(f"serving {args.runs_dir.resolve()} read-only on http://{host}:{port} (auditors: "
          f"{', '.join(a.name for a in taxonomy.authorities.values() if a.role == 'auditor')})", flush=True)
    uvicorn.run(app, host=host, port=int(port), log_level="warning", h11_max_incomplete_event_size=65536)
    return 0
