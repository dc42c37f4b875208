"""``smalti serve``: a read-only HTTP service over a folder of runs, for auditors (docs/auditing.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from smalti.errors import SmaltiError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve runs read-only to auditors (signed requests, RFC 9421)",
        description="Serve every run in RUNS_DIR (runs still training included) over HTTP, read-only: runs and lineage, "
        "C2SP checkpoints and tlog tiles, entries, inclusion and consistency proofs, the forensic queries, "
        "entropy profiles, deletion certificates and the HTML report; the JSON API's OpenAPI schema is at "
        "/openapi.json. Every request must be signed (HTTP Message Signatures, RFC 9421) for --origin by a "
        "key the signed taxonomy names in the auditor role, or carry a session bought with a sign-in code "
        "(smalti auditor sign-in). A run is marked trusted only if the taxonomy's trainer signed it. "
        "Every access is recorded in an append-only Merkle log signed by the service's key.",
        epilog="Behind a TLS-terminating reverse proxy, give --origin https://audit.example and listen on loopback; "
        "or give --tls-cert/--tls-key to serve https itself. See docs/auditing.md.",
    )
    parser.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    parser.add_argument(
        "--taxonomy", type=Path, required=True, help="the signed taxonomy naming the auditors and trainer"
    )
    parser.add_argument("--trust", type=Path, required=True, help="the data-governance public key that signed it")
    parser.add_argument("--listen", default="127.0.0.1:8700", metavar="HOST:PORT", help="default 127.0.0.1:8700")
    parser.add_argument(
        "--origin",
        metavar="URL",
        help="the public origin auditors reach and sign for, e.g. https://audit.example (default: "
        "http://HOST:PORT of --listen, or https:// with --tls-cert); requests for any other host "
        "are refused",
    )
    parser.add_argument("--access-log", type=Path, help="the access log (default: RUNS_DIR/.smalti-access.sqlite)")
    parser.add_argument(
        "--service-key",
        metavar="KEY",
        help="the key that signs the access log's checkpoints: a key file or pkcs11: URI (default: "
        "the access log's folder/.smalti-service.key, made on first start)",
    )
    parser.add_argument("--tls-cert", type=Path, help="serve https with this certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a connection has to send a request's head, and a sign-in request its body (default 10)",
    )
    parser.add_argument("--max-connections", type=int, default=1000, help="open connections in all (default 1000)")
    parser.add_argument(
        "--max-per-client", type=int, default=256, help="open connections from one address (default 256)"
    )
    parser.add_argument(
        "--proxy",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a reverse proxy in front of the service (e.g. 127.0.0.1): for requests from it, the "
        "client is the last address it appended to X-Forwarded-For (for throttling and the "
        "access log), and it is exempt from --max-per-client; repeatable",
    )
    parser.add_argument(
        "--public-tiles",
        action="store_true",
        help="serve the runs' tlog tiles and entry bundles (/api/runs/RUN/tile/...) without a credential, full "
        "ones marked immutable so a CDN or HTTP cache in front can answer them: only for ledgers anyone may "
        "read (every entry's classes, example ids and losses are in the bundles); see docs/auditing.md",
    )
    parser.set_defaults(run=run)


def _service_key(args: argparse.Namespace, log: Path):
    from smalti.trust.keys import SigningKey, write_key_pair

    if args.service_key:
        return SigningKey.load(args.service_key)
    path = log.parent / ".smalti-service.key"
    if not path.exists():
        write_key_pair(".smalti-service", log.parent)
    return SigningKey.load(path)


def run(args: argparse.Namespace) -> int:
    from smalti.trust.keys import PublicKey
    from smalti.trust.taxonomy import Taxonomy

    if not args.runs_dir.is_dir():
        raise SmaltiError(f"{args.runs_dir}: not a folder of runs")
    host, sep, port = args.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise SmaltiError(f"--listen {args.listen!r}: expected HOST:PORT, e.g. 127.0.0.1:8700")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SmaltiError("--tls-cert and --tls-key go together")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise SmaltiError(f"{path}: not found")
    scheme = "https" if args.tls_cert else "http"
    origin = args.origin or f"{scheme}://{host}:{port}"
    if args.origin is None and host in ("0.0.0.0", "::", "[::]"):
        raise SmaltiError(
            f"--listen {args.listen}: listening on every address, give --origin with the name auditors "
            f"use (e.g. https://audit.example): signatures are bound to it"
        )
    taxonomy = Taxonomy.load(args.taxonomy, PublicKey.load(args.trust))
    if not any(a.role == "auditor" and a.key for a in taxonomy.authorities.values()):
        raise SmaltiError(
            f"{args.taxonomy}: names no auditor key; nobody could read (add an authority with role "
            "auditor and its key, and sign the taxonomy again)"
        )
    try:
        from smalti.serve.app import create_app
        from smalti.serve.server import ConnectionLimits
        from smalti.serve.server import run as serve_forever
        from smalti.serve.service import ServeSettings
    except ImportError:
        raise SmaltiError("smalti serve needs the serve extra: pip install 'smalti[serve]'") from None
    log = args.access_log or args.runs_dir / ".smalti-access.sqlite"
    settings = ServeSettings(
        runs_dir=args.runs_dir,
        taxonomy=taxonomy,
        origin=origin,
        access_log=log,
        service_key=_service_key(args, log),
        proxies=tuple(args.proxy),
        body_timeout=args.header_timeout,
        public_tiles=args.public_tiles,
    )
    app = create_app(settings)
    service = app.state.service
    auditors = ", ".join(a.name for a in taxonomy.authorities.values() if a.role == "auditor")
    print(
        f"serving {args.runs_dir} read-only as {service.origin} on {host}:{port} "
        f"(auditors: {auditors})\naccess log {log}, signed by {service.access_verifier}\n"
        f"sign in to the web UI with: smalti auditor sign-in {service.origin} --key AUDITOR_KEY --open",
        flush=True,
    )
    if service.access_log.lock.took_over_stale:
        print(
            f"note: a previous service on this access log ({service.access_log.lock.previous.get('pid')}) ended "
            f"without closing it",
            flush=True,
        )
    limits = ConnectionLimits(
        args.header_timeout, args.max_connections, args.max_per_client, tuple(sorted(service.proxies))
    )
    try:
        serve_forever(
            app,
            host,
            int(port),
            limits,
            str(args.tls_cert) if args.tls_cert else None,
            str(args.tls_key) if args.tls_key else None,
        )
    finally:
        service.close()
    return 0
