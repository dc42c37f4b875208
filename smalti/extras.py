"""Optional dependencies, named by the extra that installs them: a command checks its own before any work starts,
and says in one line what to install (not a ModuleNotFoundError half a minute in)."""

from __future__ import annotations

import importlib

from smalti.errors import SmaltiError


class MissingExtra(SmaltiError):
    """An optional package a command needs is not installed."""


def require(extra: str, command: str, *modules: str) -> None:
    """Raise ``MissingExtra`` naming ``extra`` unless every module imports."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(
                f"{command} needs the {extra} extra ({module} is not installed): pip install 'smalti[{extra}]'"
            ) from None
