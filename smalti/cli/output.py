"""Where the command line prints: rich's console, minus its habit of cutting text at 80 columns.

Outside a terminal (a pipe, a log file, CI) rich assumes 80 columns and wraps or cuts
with an ellipsis, which turns ``gutenberg/tragedy/troilus_and_cressida`` and
``gutenberg/tragedy/titus_andronicus`` into the same ``gutenberg/tragedy/tr…``. An
auditor's output must never lose a name: outside a terminal every line is as long as
it needs to be; in one, tables fold long names onto the next line instead of cutting them.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

UNLIMITED = 1 << 16  # columns: wide enough that nothing wraps


def console(stderr: bool = False) -> Console:
    terminal = Console(file=sys.stderr if stderr else sys.stdout)
    if terminal.is_terminal:
        return terminal
    return Console(file=sys.stderr if stderr else sys.stdout, width=UNLIMITED, soft_wrap=True)


def table(title: str | None = None, **options) -> Table:
    """A table whose cells fold (never cut) where a terminal is too narrow."""
    return Table(title=title, title_justify="left", **options)


def add_columns(target: Table, *names: str) -> None:
    for name in names:
        target.add_column(name, overflow="fold")


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``1 class``, ``2 classes``: a count with its noun in the right number."""
    if number == 1:
        return f"{number:,} {noun}"
    return f"{number:,} {plural or (noun + 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else noun + 's')}"
