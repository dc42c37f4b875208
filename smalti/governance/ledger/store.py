"""The ledger's embedded store: one SQLite file in the run directory.

SQLite because an auditor can open it with any tool, a committed transaction
survives kill -9 (the journal rolls back a half-written one), and it needs
no server. Three tables:

- ``entries(idx, step, leaf, data)``: the entry bytes and their leaf hash
  (the hash is stored to point at the first edited entry; it is recomputed,
  never trusted, by verification);
- ``heads(size, root, timestamp, final, key_id, signature, weights)``: signed tree heads;
- ``meta(key, value)``: the format identifier (``smalti.formats.LEDGER``, checked
  whenever the file is opened) and the trainer's public key (informational: what
  is trusted is what ``--pubkey`` names).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Iterator, Sequence

from smalti import formats
from smalti.errors import SmaltiError
from smalti.trust.keys import PublicKey
from smalti.trust.entry import TreeHead

LEDGER_FILE = "ledger.sqlite"
ENTRY_FORMAT = 2  # in the run entry: 2 packs the numeric tables (see entry.py); format 1 entries still verify

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (idx INTEGER PRIMARY KEY, step INTEGER NOT NULL, leaf BLOB NOT NULL,
                                    data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS heads (size INTEGER PRIMARY KEY, root BLOB NOT NULL, timestamp TEXT NOT NULL,
                                  final INTEGER NOT NULL, key_id TEXT NOT NULL, signature BLOB NOT NULL,
                                  weights TEXT NOT NULL DEFAULT '');
"""


READ_SECONDS = 120.0  # the longest a read-only connection may run queries (a hostile file's, or an audit's)
_GOOD_SHAPES: set[tuple[int, int, int, int]] = set()


class LedgerError(SmaltiError):
    """A ledger that cannot be opened, continued or trusted."""


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGER_FILE


class LedgerStore:
    def __init__(self, path: str | Path, *, create: bool = False, read_only: bool = False) -> None:
        """``read_only``: nothing is written through this connection, and nothing is created beside the file
        (``smalti serve``, lineage readers). A ledger whose writer is not running (no ``-shm`` beside it: its last
        writer closed it, or only a stray ``-wal`` is left) is opened ``immutable``, so SQLite creates no
        ``-wal``/``-shm`` in a folder it only reads (a stray ``-wal``'s uncheckpointed pages are then not read:
        the reader sees the last state the file itself holds). While a trainer appends, its own ``-wal`` and
        ``-shm`` exist and the reader joins them as any WAL reader does.

        Before any query, the file's tables must be Smalti's: a file another program wrote may hold views in
        their place (a recursive one never ends)."""
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise LedgerError(f"{self.path}: no ledger here (was the run trained with governance.ledger?)")
        if read_only:
            try:
                live = all(self.path.with_name(self.path.name + s).exists() for s in ("-wal", "-shm"))
                self.db = sqlite3.connect(
                    f"{self.path.absolute().as_uri()}?mode=ro{'' if live else '&immutable=1'}",
                    uri=True,
                    isolation_level=None,
                )
                deadline = time.monotonic() + READ_SECONDS  # whatever a file holds, no read runs longer
                self.db.set_progress_handler(lambda: int(time.monotonic() > deadline), 100_000)
                problem = self._checked_shape()
            except (sqlite3.DatabaseError, RecursionError) as error:
                raise LedgerError(f"{self.path}: not a readable ledger ({error})") from None
            if problem:
                self.db.close()
                raise LedgerError(problem)
            return
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None)  # explicit transactions only
            self.db.execute("PRAGMA page_size=16384")  # entries are ~5 kB: one page each, not an overflow chain
            self.db.execute("PRAGMA mmap_size=1073741824")  # verification reads the whole file once
            self.db.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            found = self.get_meta("format")
            problem = formats.format_problem(found, formats.LEDGER, str(self.path))
            if problem and (found is not None or self.size()):  # a new, empty file names no format yet
                self.db.close()
                raise LedgerError(problem)
        except sqlite3.DatabaseError as error:
            raise LedgerError(f"{self.path}: not a readable ledger ({error})") from None

    _TABLES = {
        "meta": ["key", "value"],
        "entries": ["idx", "step", "leaf", "data"],
        "heads": ["size", "root", "timestamp", "final", "key_id", "signature", "weights"],
    }

    def _checked_shape(self) -> str | None:
        """Smalti's tables, then its format, once per version of the file (its device, inode, size and time): a
        reader that opens the same ledger for every request pays for the checks once."""
        status = os.stat(self.path)
        key = (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        if key not in _GOOD_SHAPES:
            shape = self._shape_problem()
            problem = (
                f"{self.path}: {shape}"
                if shape
                else formats.format_problem(self.get_meta("format"), formats.LEDGER, str(self.path))
            )
            if problem:
                return problem
            if len(_GOOD_SHAPES) > 4096:
                _GOOD_SHAPES.clear()
            _GOOD_SHAPES.add(key)
        return None

    def _shape_problem(self) -> str | None:
        """A file another program wrote may hold views (a recursive one never ends) or other columns in place of
        Smalti's tables: a reader refuses it before running a query on it."""
        found = dict(self.db.execute("SELECT name, type FROM sqlite_master WHERE name IN ('meta', 'entries', 'heads')"))
        for table, columns in self._TABLES.items():
            if found.get(table) != "table":
                return f"not a ledger ({table} is {'missing' if table not in found else 'a ' + found[table]})"
            names = [row[1] for row in self.db.execute(f"PRAGMA table_info({table})")]
            if names != columns:
                return f"not a ledger (the {table} table's columns are {', '.join(names)})"
        return None

    def close(self) -> None:
        self.db.close()

    # -------------------------------------------------------------- meta

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def start_log(self, trainer_key: PublicKey, log_name: str = "smalti") -> str:
        """Name this file's format, the key that signs its heads and the log's origin, before the first
        entry; returns the origin: ``LOG_NAME/RUN_ID``, unique per ledger (a C2SP checkpoint's first line,
        and the key name its signatures carry)."""
        from smalti.trust.note import check_key_name

        origin = check_key_name(f"{log_name.rstrip('/')}/{uuid.uuid4().hex[:16]}")
        self.set_meta({"format": formats.LEDGER, "trainer_public_key": trainer_key.text, "origin": origin})
        return origin

    @property
    def origin(self) -> str:
        return self.get_meta("origin") or ""

    @property
    def trainer_key(self) -> PublicKey:
        """The key that signs this ledger's heads, as the ledger records it."""
        return PublicKey.parse(self.get_meta("trainer_public_key") or "", f"{self.path}: the recorded trainer key")

    def set_meta(self, values: dict[str, str]) -> None:
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(values.items()))

    # -------------------------------------------------------------- entries

    def size(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def append(self, rows: Sequence[tuple[int, int, bytes, bytes]], head: TreeHead | None = None) -> None:
        """Commit entries (index, step, leaf, data) and optionally a tree head, all or nothing."""
        with self._transaction():
            self.db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?)", rows)
            if head is not None:
                self._insert_head(head)

    def add_head(self, head: TreeHead) -> None:
        with self._transaction():
            self._insert_head(head)

    def _insert_head(self, head: TreeHead) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO heads VALUES (?, ?, ?, ?, ?, ?, ?)",
            (head.size, head.root, head.timestamp, int(head.final), head.key_id, head.signature, head.weights),
        )

    def truncate(self, size: int) -> None:
        """Forget entries and heads past ``size`` (what a crashed run wrote after its last checkpoint)."""
        with self._transaction():
            self.db.execute("DELETE FROM entries WHERE idx >= ?", (size,))
            self.db.execute("DELETE FROM heads WHERE size > ?", (size,))

    def rows(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int, bytes, bytes]]:
        """(index, step, leaf, data) in index order."""
        stop = stop if stop is not None else 2**62
        # A plain loop, not ``yield from``: a reader that stops early and closes the store must not have the
        # cursor closed after the connection (``yield from`` would, when the generator is collected).
        for row in self.db.execute(
            "SELECT idx, step, leaf, data FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, stop)
        ):
            yield row

    def row_chunks(self, size: int, start: int | None = None) -> Iterator[list[tuple[int, int, bytes, bytes]]]:
        """All rows (from index ``start`` on) in index order, ``size`` at a time (what verification reads)."""
        if start is None:
            cursor = self.db.execute("SELECT idx, step, leaf, data FROM entries ORDER BY idx")
        else:
            cursor = self.db.execute("SELECT idx, step, leaf, data FROM entries WHERE idx >= ? ORDER BY idx", (start,))
        while rows := list(itertools.islice(cursor, size)):  # iterating beats fetchmany (measured)
            yield rows

    def leaves(self, stop: int | None = None) -> list[bytes]:
        stop = stop if stop is not None else 2**62
        return [row[0] for row in self.db.execute("SELECT leaf FROM entries WHERE idx < ? ORDER BY idx", (stop,))]

    def entry_at_step(self, step: int) -> tuple[int, bytes, bytes] | None:
        row = self.db.execute("SELECT idx, leaf, data FROM entries WHERE step = ? AND idx > 0", (step,)).fetchone()
        return (int(row[0]), row[1], row[2]) if row else None

    def latest_head(self) -> TreeHead | None:
        """The newest signed head (one row read, however many heads the ledger holds)."""
        row = self.db.execute(
            "SELECT size, root, timestamp, final, key_id, signature, weights FROM heads ORDER BY size DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None
        s, r, t, f, k, sig, w = row
        return TreeHead(
            size=s, root=r, timestamp=t, final=bool(f), key_id=k, signature=sig, weights=w, origin=self.origin
        )

    def head_of_size(self, size: int) -> TreeHead | None:
        row = self.db.execute(
            "SELECT size, root, timestamp, final, key_id, signature, weights FROM heads WHERE size = ?", (size,)
        ).fetchone()
        if row is None:
            return None
        s, r, t, f, k, sig, w = row
        return TreeHead(
            size=s, root=r, timestamp=t, final=bool(f), key_id=k, signature=sig, weights=w, origin=self.origin
        )

    def leaf_range(self, start: int, stop: int) -> list[bytes]:
        """The leaf hashes of entries ``start`` to ``stop - 1``."""
        return [
            row[0]
            for row in self.db.execute(
                "SELECT leaf FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, stop)
            )
        ]

    def index_at_step(self, step: int) -> int | None:
        """The index of the last entry at or before ``step`` (None before the first step)."""
        row = self.db.execute("SELECT MAX(idx) FROM entries WHERE step <= ? AND idx > 0", (step,)).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def __enter__(self) -> "LedgerStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def heads(self) -> list[TreeHead]:
        rows = self.db.execute(
            "SELECT size, root, timestamp, final, key_id, signature, weights FROM heads ORDER BY size"
        )
        origin = self.origin
        return [
            TreeHead(size=s, root=r, timestamp=t, final=bool(f), key_id=k, signature=sig, weights=w, origin=origin)
            for s, r, t, f, k, sig, w in rows
        ]

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
