"""Argument types the commands share, so a bad value is refused by argparse with the option's name."""

from __future__ import annotations

import argparse
from pathlib import Path


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value


def named_key(entry: str, flag: str) -> tuple[str, Path]:
    """``NAME=PUB`` (an authority's name and its public key file), or a one-line error naming ``flag``."""
    from smalti.errors import SmaltiError

    name, sep, pub = entry.partition("=")
    if not sep or not name or not pub:
        raise SmaltiError(
            f"{flag} {entry!r}: expected NAME=PUB, e.g. {flag.lstrip('-')}-one=keys/{flag.lstrip('-')}.pub"
        )
    return name, Path(pub)
