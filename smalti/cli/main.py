"""``smalti``: the command line. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from smalti.cli import audit, data, forget, keys, ledger, policy, sample, taxonomy, train
from smalti.errors import SmaltiError

COMMANDS = (train, sample, keys, taxonomy, data, policy, ledger, audit, forget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smalti",
        description="Train PyTorch models fast, and govern what they learn.",
        epilog="Run 'smalti COMMAND --help' for a command's options.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except SmaltiError as error:
        print(f"smalti: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `smalti ledger show RUN | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("smalti: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
