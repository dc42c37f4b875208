"""A local cache of remote shards, with a size limit that is never exceeded.

Files are named by their sha256 (``<sha256>.shard``), so a cache can be
shared by datasets and runs, and a file can only ever hold the bytes its name
promises. ``index.json`` lists what the cache downloaded; only those files
are ever deleted, so nothing else in the folder (and never a local dataset,
which is read in place and not cached) can be lost to eviction.

Rules:

- the total size of cached shards never exceeds ``limit_bytes``; room is made
  by evicting the least recently used shards first;
- a shard pinned by any process (a shared ``flock`` on ``<sha256>.pin``
  while it is in use) is never evicted;
- a limit smaller than the largest shard is an error at open time.

All index changes happen under an exclusive ``flock`` on ``.lock``, so
several loader workers and ranks can share one cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path
from typing import IO, Callable, Iterator

from smalti.errors import DataError
from smalti.io import atomic_write_bytes, atomic_write_text, Closing

SUFFIX = ".shard"


class ShardCache(Closing):
    def __init__(self, directory: str | Path, limit_bytes: int) -> None:
        if limit_bytes <= 0:
            raise DataError(f"cache limit must be positive, got {limit_bytes}")
        self.directory = Path(directory)
        self.limit_bytes = int(limit_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._pins: dict[str, IO[bytes]] = {}

    # ------------------------------------------------------------ bookkeeping

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            yield index
            self._write_index(index)

    def _read_index(self) -> dict:
        path = self.directory / "index.json"
        if not path.is_file():
            return {"entries": {}}
        return json.loads(path.read_text(encoding="utf-8"))

    def _write_index(self, index: dict) -> None:
        atomic_write_text(self.directory / "index.json", json.dumps(index, indent=1, sort_keys=True))

    def _path(self, digest: str) -> Path:
        return self.directory / f"{digest}{SUFFIX}"

    def used_bytes(self) -> int:
        return sum(int(e["bytes"]) for e in self._read_index()["entries"].values())

    def cached(self) -> set[str]:
        return set(self._read_index()["entries"])

    def check_fits(self, largest_shard: int, name: str) -> None:
        if largest_shard > self.limit_bytes:
            raise DataError(
                f"cache limit of {self.limit_bytes:,} bytes ({self.directory}) is smaller than shard {name} "
                f"({largest_shard:,} bytes); raise data.cache_limit"
            )

    # ------------------------------------------------------------ pins

    def pin(self, digest: str) -> None:
        """Mark a shard in use by this process until ``unpin``; eviction skips it."""
        if digest not in self._pins:
            handle = open(self.directory / f"{digest}.pin", "a+b")
            fcntl.flock(handle, fcntl.LOCK_SH)
            self._pins[digest] = handle

    def unpin(self, digest: str) -> None:
        handle = self._pins.pop(digest, None)
        if handle is not None:
            handle.close()

    def _in_use(self, digest: str) -> bool:
        if digest in self._pins:
            return True
        pin = self.directory / f"{digest}.pin"
        if not pin.exists():
            return False
        with open(pin, "a+b") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    # ------------------------------------------------------------ reads

    def _touch(self, digest: str) -> None:
        """Recency for LRU eviction lives in the pin file's mtime, so a cache hit rewrites no index."""
        pin = self.directory / f"{digest}.pin"
        pin.touch()
        os.utime(pin, ns=(time.time_ns(), time.time_ns()))

    def _last_used(self, digest: str) -> int:
        pin = self.directory / f"{digest}.pin"
        return pin.stat().st_mtime_ns if pin.exists() else 0

    def verified_path(self, digest: str) -> Path | None:
        """The cached file of a shard verified on entry and unchanged since, pinned; else None."""
        path = self._path(digest)
        with open(self.directory / ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            entry = self._read_index()["entries"].get(digest)
            if entry is None or not entry.get("verified") or not path.exists():
                return None
            stat = path.stat()
            if stat.st_size != entry["bytes"] or stat.st_mtime_ns != entry["mtime_ns"]:
                return None
            self._touch(digest)
            self.pin(digest)
            return path

    def read(self, digest: str, size: int, download: Callable[[], bytes]) -> tuple[bytes, bool]:
        """The shard's bytes, from the cache or downloaded into it, and whether they are verified.

        ``verified`` is true only for a cache hit that was fully verified
        when it entered the cache (``mark_verified``); the caller verifies
        anything else before use. The cache never serves a file whose size or
        modification time changed since it was stored. The shard stays pinned
        (never evicted) until ``unpin``.
        """
        path = self._path(digest)
        with self._locked() as index:
            entry = index["entries"].get(digest)
            if entry is not None:
                stat = path.stat() if path.exists() else None
                if stat is not None and stat.st_size == entry["bytes"] and stat.st_mtime_ns == entry["mtime_ns"]:
                    self._touch(digest)
                    self.pin(digest)
                    return path.read_bytes(), bool(entry.get("verified"))
                del index["entries"][digest]  # changed behind our back: forget it, fetch again
        data = download()
        if len(data) != size:
            raise DataError(f"downloaded {len(data):,} bytes for shard {digest[:12]}..., the manifest says {size:,}")
        with self._locked() as index:
            self._make_room(index, size, exclude=digest)
            atomic_write_bytes(path, data)
            index["entries"][digest] = {"bytes": size, "mtime_ns": path.stat().st_mtime_ns, "verified": False}
            self._touch(digest)
            self.pin(digest)
        return data, False

    def mark_verified(self, digest: str) -> None:
        with self._locked() as index:
            if digest in index["entries"]:
                index["entries"][digest]["verified"] = True

    def _make_room(self, index: dict, size: int, exclude: str) -> None:
        entries = index["entries"]
        used = sum(int(e["bytes"]) for d, e in entries.items() if d != exclude)
        for digest in sorted(entries, key=self._last_used):
            if used + size <= self.limit_bytes:
                break
            if digest == exclude or self._in_use(digest):
                continue
            self._path(digest).unlink(missing_ok=True)
            (self.directory / f"{digest}.pin").unlink(missing_ok=True)
            used -= int(entries.pop(digest)["bytes"])
        if used + size > self.limit_bytes:
            raise DataError(
                f"cache {self.directory} cannot fit {size:,} more bytes under its {self.limit_bytes:,}-byte limit: "
                f"the cached shards are in use; raise data.cache_limit"
            )

    def close(self) -> None:
        for digest in list(self._pins):
            self.unpin(digest)
