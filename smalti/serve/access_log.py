"""Who read what: an append-only log of the requests to ``smalti serve``, itself a signed Merkle log.

Each record is canonical JSON; its leaf is RFC 6962's SHA-256(0x00 || record). ``GET /api/access-log`` gives
the log as a C2SP checkpoint signed by the service's own key (``--service-key``), and a consistency proof
between any two sizes, so an auditor who kept an earlier checkpoint can check later that nothing was taken
out or rewritten. All auditors see all records: one shared history is what lets each of them check that the
service showed everyone the same log (docs/auditing.md).

What is recorded, and what bounds it:

- every authenticated request (a signed one or a session's), whatever its answer, 500s included: time, reader,
  key id, method, path, query string, status;
- sign-ins and sign-outs, with the reader;
- refused requests are not one record each (anyone who reaches the port could fill the disk): they are counted
  per client address and status, and one record per (client, status) is written per minute, with the count;
  past 1,024 addresses in a minute the rest are counted together.

The file lives beside the runs (never inside one: reading a run must not change it), and only one service
may write it at a time: a second ``smalti serve`` on the same log refuses to start, naming the first.

Records join the Merkle log at once (the signed checkpoint covers them) and reach the file in batches, one
transaction every 50 ms, from a thread of the log's own: a request never waits for the disk. A killed service
loses at most the last 50 ms of records, a power cut the records since SQLite last synced (WAL, synchronous
NORMAL).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from smalti.trust.keys import SigningKey
from smalti.trust import merkle
from smalti.trust.note import checkpoint_text, signature_line
from smalti.locks import FolderLock
from smalti.io import Closing

_SCHEMA = "CREATE TABLE IF NOT EXISTS access (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL, record TEXT NOT NULL)"
MAX_QUERY = 512  # characters of a query string kept
MAX_REFUSAL_BUCKETS = 1024


class AccessLog(Closing):
    def __init__(self, path: Path, key: SigningKey, origin: str, window: float = 60.0) -> None:
        self.path = Path(path)
        self.lock = FolderLock(
            self.path.with_name(self.path.name + ".lock"), f"serving with access log {self.path.name}"
        )
        self.lock.acquire()  # before the file is touched: a second service stops here
        self.key, self.origin, self.window = key, origin, window
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()  # the Merkle log and the records not yet written
        self._disk = threading.Lock()  # the file
        self._pending: list[tuple[int, bytes, str]] = []
        self._frontier = merkle.Frontier()
        for (leaf,) in self._db.execute("SELECT leaf FROM access ORDER BY idx"):
            self._frontier.append(leaf)
        self._refusals: dict[tuple[str, int], int] = {}
        self._closed = False
        self._stop = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._writer.start()
        self._window_start = time.time()

    # ---------------------------------------------------------------- writing

    def _append(self, record: dict[str, Any]) -> None:
        """Into the Merkle log now, into the file with the next batch (the caller holds ``_lock``)."""
        body = json.dumps(record, sort_keys=True, separators=(",", ":"))
        leaf = merkle.leaf_hash(body.encode())
        self._pending.append((self._frontier.size, leaf, body))
        self._frontier.append(leaf)

    def flush(self) -> None:
        """Write every record taken so far, in one transaction."""
        with self._disk:
            with self._lock:
                rows, self._pending = self._pending, []
            if rows and not self._closed:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO access VALUES (?, ?, ?)", rows)
                self._db.execute("COMMIT")

    def _write_loop(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.flush()
            except sqlite3.Error:  # a full disk: the records stay pending, the service goes on
                pass

    def record(
        self,
        reader: str | None,
        key_id: str | None,
        method: str,
        path: str,
        query: str,
        status: int,
        event: str = "request",
    ) -> None:
        record = {
            "time": round(time.time(), 3),
            "event": event,
            "reader": reader,
            "key_id": key_id,
            "method": method,
            "path": path,
            "query": query[:MAX_QUERY],
            "status": status,
        }
        with self._lock:
            self._flush_refusals(force=False)
            self._append(record)

    def refused(self, client: str, status: int) -> None:
        """Count a refused, unauthenticated request (written as one record per client and status per window)."""
        with self._lock:
            self._flush_refusals(force=False)
            key = (client, status)
            if key not in self._refusals and len(self._refusals) >= MAX_REFUSAL_BUCKETS:
                key = ("(others)", status)
            self._refusals[key] = self._refusals.get(key, 0) + 1

    def _flush_refusals(self, force: bool) -> None:
        now = time.time()
        if not self._refusals or (not force and now - self._window_start < self.window):
            if not self._refusals:
                self._window_start = now
            return
        for (client, status), count in sorted(self._refusals.items()):
            self._append(
                {
                    "time": round(now, 3),
                    "event": "refused",
                    "client": client,
                    "status": status,
                    "count": count,
                    "since": round(self._window_start, 3),
                }
            )
        self._refusals, self._window_start = {}, now

    # ---------------------------------------------------------------- reading

    def checkpoint(self) -> str:
        """The log's head as a C2SP checkpoint in a signed note, by the service key."""
        with self._lock:
            self._flush_refusals(force=True)
            size = self._frontier.size
            root = self._frontier.root() if size else merkle.root([])
        text = checkpoint_text(self.origin, size, root, [])
        return text + "\n" + signature_line(self.origin, self.key.public.raw, self.key.sign(text.encode()))

    def head(self, last: int = 20) -> dict[str, Any]:
        note = self.checkpoint()
        self.flush()
        with self._disk:
            size = int(note.split("\n")[1])
            rows = self._db.execute(
                "SELECT idx, record FROM access WHERE idx >= ? AND idx < ? ORDER BY idx", (max(0, size - last), size)
            ).fetchall()
        return {
            "size": size,
            "root": (self._frontier.root() if size else merkle.root([])).hex(),
            "checkpoint": note,
            "last": [dict(json.loads(r), index=i) for i, r in rows],
        }

    def _leaf_hashes(self, stop: int) -> list[bytes]:
        """Read from the file when asked (proofs are rare; the log's size is not bounded by memory)."""
        self.flush()
        with self._disk:
            return [leaf for (leaf,) in self._db.execute("SELECT leaf FROM access WHERE idx < ? ORDER BY idx", (stop,))]

    def consistency(self, first: int, second: int) -> list[bytes]:
        return merkle.consistency_proof(first, self._leaf_hashes(second))

    def inclusion(self, index: int, size: int) -> tuple[str, list[bytes]]:
        leaves = self._leaf_hashes(size)
        with self._disk:
            (record,) = self._db.execute("SELECT record FROM access WHERE idx = ?", (index,)).fetchone()
        return record, merkle.inclusion_proof(index, leaves)

    @property
    def size(self) -> int:
        return self._frontier.size

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._flush_refusals(force=True)
        self._stop.set()
        self._writer.join(timeout=5)
        self.flush()
        with self._disk:
            self._closed = True
            self._db.close()
        self.lock.release()
