"""The format identifiers Smalti writes into its files, and the one rule for reading them back.

Every file that outlives a process names its format as ``smalti-<kind>/<version>``, so
that a reader (ours, or an auditor's script) knows what it holds before it trusts a field.
Nothing has been released under any other identifier: a file that names another one, or
none where one belongs, was written by an older format (or by another program), and
reading it is a one-line error naming the file, never a traceback or a silent misreading.
"""

from __future__ import annotations

import re

CHECKPOINT = "smalti-checkpoint/1"
DATASET = "smalti-dataset/1"  # the signed manifest.json of a prepared dataset
LEDGER = "smalti-ledger/3"  # the ledger's SQLite meta; 2: entries pack their numeric tables; 3: C2SP heads
TREE_HEAD = "smalti-ledger-tree-head/2"  # an extension line of every signed tree head (a C2SP checkpoint)
DELETION_CERTIFICATE = "smalti-deletion-certificate/1"
LINEAGE = "smalti-lineage/1"  # lineage.json: the parent link a deletion leaves for the trainer

_IDENTIFIER = re.compile(r"^(?P<kind>[a-z][a-z0-9-]*)/(?P<version>\d+)$")


def format_problem(found: object, expected: str, where: str) -> str | None:
    """None when ``found`` is ``expected``; otherwise the one line that says why ``where`` cannot be read.

    A later version of the same kind is named as newer (upgrade Smalti); anything else,
    an absent identifier included, is an older format (write the file again).
    """
    if found == expected:
        return None
    mine, theirs = _IDENTIFIER.match(expected), _IDENTIFIER.match(found) if isinstance(found, str) else None
    if mine and theirs and theirs["kind"] == mine["kind"] and int(theirs["version"]) > int(mine["version"]):
        return f"{where}: written by a newer format ({found}); this version of Smalti reads {expected} (upgrade Smalti)"
    named = "names no format" if found is None else f"names format {found!r}"
    return (
        f"{where}: written by an older format ({named}); this version of Smalti reads {expected} only "
        f"(write it again with this version)"
    )
