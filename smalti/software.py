"""What wrote a piece of evidence: Smalti, torch and Python versions.

Recorded in every ledger's run entry, every deletion certificate and the audit report,
because an exact replay is exact on the same software only; read from the installed
metadata, so asking costs no torch import.
"""

from __future__ import annotations

import platform
from importlib import metadata

from smalti import __version__


def software() -> dict[str, str]:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {"smalti": __version__, "torch": torch_version, "python": platform.python_version()}


def describe(versions: dict[str, str]) -> str:
    return f"smalti {versions.get('smalti', '?')} (torch {versions.get('torch', '?')}, Python {versions.get('python', '?')})"
