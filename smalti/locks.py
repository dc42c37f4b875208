"""One writer per folder: an exclusive ``flock`` on a lock file, with the holder named inside it.

Why ``flock``: the kernel drops the lock when the holding process dies, kill -9 included, so a lock
left behind by a crash is never mistaken for a live one, and there is no stale-lock guessing by pid.
The file keeps the last holder's pid, host, command and start time, so the refusal can name who holds
it (and a lock taken over from a dead process says whose it was). Locks are advisory and local: two
hosts writing one folder over NFS are not stopped by this (NFS locking varies); ``docs/auditing.md``
and ``docs/recipes.md`` say so.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType

from smalti.errors import SmaltiError


class LockHeld(SmaltiError):
    """Another live process holds the lock."""


class FolderLock:
    """``with FolderLock(path, "training into run/"):`` holds an exclusive lock on ``path`` until the block ends."""

    def __init__(self, path: str | Path, purpose: str) -> None:
        self.path, self.purpose = Path(path), purpose
        self._handle: int | None = None
        self.previous: dict[str, object] = {}

    def acquire(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise LockHeld(f"{self.path.parent}: {describe_holder(holder)} (lock {self.path.name}); wait for it "
                           f"to finish or stop it") from None
        self.previous = _read_holder(handle)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                  "command": " ".join(sys.argv)[:300],
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(record) + "\n").encode(), 0)
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            os.ftruncate(self._handle, 0)  # released cleanly: an empty file names no holder
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None

    @property
    def took_over_stale(self) -> bool:
        """Whether the file still named a holder: one that died without releasing it (a killed process)."""
        return bool(self.previous)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _read_holder(handle: int) -> dict[str, object]:
    try:
        found = json.loads(os.pread(handle, 4096, 0).decode("utf-8") or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def describe_holder(holder: dict[str, object]) -> str:
    """``in use by pid 4242 on host gpu-3 (training into run/, since 2026-12-07T02:13:15+00:00)``."""
    if not holder:
        return "in use by another process"
    return (f"in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"({holder.get('purpose', '?')}, since {holder.get('since', '?')})")
