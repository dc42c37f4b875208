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


RUN_LOCK = ".smalti.lock"  # in a run directory: held by the one process writing it


class LockHeld(SmaltiError):
    """Another live process holds the lock."""


_HELD: dict[str, list[int]] = {}  # real path -> [handle, holders] of the locks this process holds exclusively


class FolderLock:
    """``with FolderLock(path, "training into run/"):`` holds an exclusive lock on ``path`` until the block ends.

    Re-entrant within a process (``smalti forget`` holds its output folder's lock while the trainer it starts
    takes the same lock). ``shared=True`` (readers: a deletion reading its parent) only checks that no writer
    holds the lock, and creates no file where there is none."""

    def __init__(self, path: str | Path, purpose: str, shared: bool = False) -> None:
        self.path, self.purpose, self.shared = Path(path), purpose, shared
        self._handle: int | None = None
        self._key = ""
        self.previous: dict[str, object] = {}

    def acquire(self) -> "FolderLock":
        self._key = os.path.realpath(self.path)
        if self._key in _HELD:  # this process holds it already
            _HELD[self._key][1] += 1
            self._handle = -1
            return self
        if self.shared:
            return self._check_no_writer()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise LockHeld(
                f"{self.path.parent}: {describe_holder(holder)} (lock {self.path.name}); wait for it "
                f"to finish or stop it"
            ) from None
        _HELD[self._key] = [handle, 1]
        self.previous = _read_holder(handle)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "command": " ".join(sys.argv)[:300],
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(handle, 0)
        os.pwrite(handle, (json.dumps(record) + "\n").encode(), 0)
        self._handle = handle
        return self

    def _check_no_writer(self) -> "FolderLock":
        try:
            handle = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return self  # never written by a process that locks: nothing to wait for
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(handle)
            os.close(handle)
            raise LockHeld(f"{self.path.parent}: {describe_holder(holder)}; read it when that has finished") from None
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is None:
            return
        held = _HELD.get(self._key)
        if self._handle == -1 or (held is not None and held[0] == self._handle):
            assert held is not None  # a re-entrant hold (-1) is always registered in _HELD
            held[1] -= 1
            if held[1] == 0:
                del _HELD[self._key]
                os.ftruncate(held[0], 0)  # released cleanly: an empty file names no holder
                fcntl.flock(held[0], fcntl.LOCK_UN)
                os.close(held[0])
        else:  # a shared check
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
        self._handle = None

    @property
    def took_over_stale(self) -> bool:
        """Whether the file still named a holder: one that died without releasing it (a killed process)."""
        return bool(self.previous)

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
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
    return (
        f"in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
        f"({holder.get('purpose', '?')}, since {holder.get('since', '?')})"
    )
