"""``smalti``: the command line. Each subcommand lives in its own module.

Nothing here, nor in a command module's imports, loads torch: ``--help`` and the commands
that need no model (keys, signatures, ledger verification) start in a fraction of a second,
and torch's thread pool is configured (``smalti.threads``) before a training command first imports it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from smalti.cli import (
    admit,
    audit,
    auditor,
    data,
    evaluate,
    export,
    forget,
    keys,
    ledger,
    policy,
    sample,
    serve,
    taxonomy,
    tokenizer,
    train,
    witness,
)
from smalti.errors import SmaltiError
from smalti.threads import apply_thread_defaults

COMMANDS = (
    train,
    sample,
    evaluate,
    export,
    keys,
    taxonomy,
    tokenizer,
    data,
    policy,
    ledger,
    audit,
    forget,
    witness,
    serve,
    auditor,
    admit,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalti",
        description="Train PyTorch models fast, and govern what they learn.",
        epilog="Run 'smalti COMMAND --help' for a command's options. On a machine where other processes are busy, "
        "training makes idle torch threads sleep at once (OMP_WAIT_POLICY=PASSIVE) unless OMP_WAIT_POLICY or "
        "GOMP_SPINCOUNT is set (smalti -v COMMAND says when it does): see docs/architecture.md.",
    )
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also print notes about how Smalti set itself up (e.g. torch's thread wait policy on a busy machine)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def version_line() -> str:
    """Smalti's version and the torch it runs with, read from the installed metadata (no torch import)."""
    from smalti.software import describe, software

    return describe(software())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "trains", False):
        apply_thread_defaults(announce=args.verbose)  # before the command imports torch
    try:
        return int(args.run(args) or 0)
    except SmaltiError as error:
        print(f"smalti: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `smalti ledger show RUN | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as interrupt:  # a command may say what was kept (train names its last checkpoint)
        print(f"smalti: interrupted{f'; {interrupt}' if str(interrupt) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
