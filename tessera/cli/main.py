"""``tessera``: the command line. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from tessera.cli import audit, data, forget, keys, ledger, policy, sample, taxonomy, train
from tessera.errors import TesseraError

COMMANDS = (train, sample, keys, taxonomy, data, policy, ledger, audit, forget)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="Train PyTorch models fast, and govern what they learn.",
        epilog="Run 'tessera COMMAND --help' for a command's options.",
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
    except TesseraError as error:
        print(f"tessera: error: {error}", file=sys.stderr)
        return error.exit_code
    except BrokenPipeError:  # `tessera ledger show RUN | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("tessera: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
