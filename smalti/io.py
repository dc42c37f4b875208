"""Writing files so that nothing is ever half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator, Self


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[BinaryIO]:
    """Write through the yielded handle; readers see the old file or the whole new one.

    A temp file in the same folder (``.NAME.*.tmp``), fsync, rename, fsync the folder. On an
    exception the temp file is removed; after kill -9 it stays behind for the next writer to clean.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_writer(path) as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def remote_filesystem(url: str, storage_options: dict | None = None):
    """The fsspec filesystem for ``url``; a missing protocol package names the extra that installs it."""
    import fsspec

    from smalti.errors import DataError

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as error:
        raise DataError(
            f"{url}: {error} (s3:// and http(s):// need the remote extra: pip install 'smalti[remote]')"
        ) from None
    except ValueError as error:
        raise DataError(f"{url}: cannot open ({error})") from None


def file_sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Closing:
    """A handle that holds files, connections or processes: ``with Handle(...) as handle:`` closes it, also
    after an error. Subclasses define ``close`` (called once; closing twice must be harmless)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
