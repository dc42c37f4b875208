"""Who read what: an append-only log of every request to ``smalti serve``, itself a Merkle log.

Each record (time, reader, key id, method, path, status) is canonical JSON; its leaf is RFC 6962's
SHA-256(0x00 || record), and ``GET /api/access-log`` gives the size and root, so an auditor who kept
an earlier root can ask for a consistency proof and see that nothing was taken out. The file lives
beside the runs (never inside one): reading a run must not change it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from smalti.governance.ledger import merkle

_SCHEMA = "CREATE TABLE IF NOT EXISTS access (idx INTEGER PRIMARY KEY, leaf BLOB NOT NULL, record TEXT NOT NULL)"


class AccessLog:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        self._lock = threading.Lock()
        self._frontier = merkle.Frontier()
        for (leaf,) in self._db.execute("SELECT leaf FROM access ORDER BY idx"):
            self._frontier.append(leaf)

    def record(self, reader: str | None, key_id: str | None, method: str, path: str, status: int) -> None:
        body = json.dumps({"time": round(time.time(), 3), "reader": reader, "key_id": key_id, "method": method,
                           "path": path, "status": status}, sort_keys=True, separators=(",", ":"))
        leaf = merkle.leaf_hash(body.encode())
        with self._lock:
            self._db.execute("INSERT INTO access VALUES (?, ?, ?)", (self._frontier.size, leaf, body))
            self._frontier.append(leaf)

    def head(self, last: int = 20) -> dict[str, Any]:
        with self._lock:
            size, root = self._frontier.size, self._frontier.root() if self._frontier.size else b""
            rows = self._db.execute("SELECT idx, record FROM access WHERE idx >= ? ORDER BY idx",
                                    (max(0, size - last),)).fetchall()
        return {"size": size, "root": root.hex(), "last": [dict(json.loads(r), index=i) for i, r in rows]}

    def leaves(self, stop: int) -> list[bytes]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT leaf FROM access WHERE idx < ? ORDER BY idx", (stop,))]

    def close(self) -> None:
        self._db.close()
