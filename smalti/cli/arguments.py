"""Argument types the commands share, so a bad value is refused by argparse with the option's name."""

from __future__ import annotations

import argparse


def at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return value
