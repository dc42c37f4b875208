"""Publish a run's ledger as a C2SP tlog-tiles log: any static file server becomes a verifiable log.

Layout under the destination URL (c2sp.org/tlog-tiles)::

    checkpoint                 the latest signed tree head, a C2SP checkpoint in a signed note
    tile/<L>/<N>[.p/<W>]       Merkle tree hashes: 256 per full tile (level 0: leaf hashes; level L: the
                               roots of full subtrees of 256**L leaves); a partial tile holds the rest
    tile/entries/<N>[.p/<W>]   the entries themselves, 256 per bundle, each prefixed by its uint16 length

``<N>`` is written in zero-padded groups of three digits (``x001/x234/067``). An auditor's tlog client
fetches the checkpoint, checks its signature, and computes any inclusion or consistency proof from
the tiles (``tests/test_c2sp.py`` does so with the Go project's ``sumdb/tlog``).

Publishing is append-only and incremental: it first checks that what the destination already holds
is a prefix of this ledger (its checkpoint's root equals this ledger's root at that size; a rewritten
history is refused, never overwritten), then writes only the tiles and bundles that are new, each
once, and the checkpoint last. A full tile already published is never written again; a tile found
with other bytes than ours stops the publication.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, overload

import fsspec

from smalti.errors import SmaltiError
from smalti.trust import merkle

WIDTH = 256  # hashes per full tile, entries per full bundle (the spec's tile height of 8)
MAX_ENTRY = 0xFFFF  # entries are uint16 length-prefixed in bundles


class PublishError(SmaltiError):
    """A ledger that cannot be published to that destination, and why."""


def tile_index(n: int) -> str:
    """1234067 -> ``x001/x234/067``: three digits per element, every element but the last prefixed by x."""
    digits = f"{n:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])


def tile_path(level: int | str, n: int, width: int = WIDTH) -> str:
    """``tile/<L>/<N>[.p/<W>]`` (``level`` "entries" for an entry bundle)."""
    if not 1 <= width <= WIDTH:
        raise ValueError(f"tile width {width}: must be 1..{WIDTH}")
    return f"tile/{level}/{tile_index(n)}" + ("" if width == WIDTH else f".p/{width}")


def level_hashes(leaves: list[bytes]) -> Iterator[list[bytes]]:
    """The hashes each level of tiles holds: the leaf hashes, then the roots of every full 256-wide block of
    the level below, up to the first level with none."""
    hashes = leaves
    while hashes:
        yield hashes
        hashes = [merkle.root(hashes[i : i + WIDTH]) for i in range(0, len(hashes) - WIDTH + 1, WIDTH)]


def tiles(
    leaves: list[bytes], entries: Callable[[int, int], list[bytes]], published: int = 0
) -> Iterator[tuple[str, bytes, bool]]:
    """(path, bytes, full) of every tile and bundle a tree of ``len(leaves)`` entries needs that a tree of
    ``published`` entries did not already have as a full tile; ``entries(start, stop)`` reads entries."""
    start = published // WIDTH * WIDTH
    bundled = entries(start, len(leaves))
    for index, entry in enumerate(bundled, start):
        if len(entry) > MAX_ENTRY:
            raise PublishError(
                f"entry {index} has {len(entry)} bytes; tlog-tiles entry bundles hold at most "
                f"{MAX_ENTRY} (uint16 lengths)"
            )
    for n in range(start // WIDTH, (len(leaves) + WIDTH - 1) // WIDTH):
        chunk = bundled[n * WIDTH - start : (n + 1) * WIDTH - start]
        yield (
            tile_path("entries", n, len(chunk)),
            b"".join(struct.pack(">H", len(e)) + e for e in chunk),
            len(chunk) == WIDTH,
        )
    for level, hashes in enumerate(level_hashes(leaves)):
        before = published // WIDTH**level  # this level's hashes at the published size
        for n in range(before // WIDTH, (len(hashes) + WIDTH - 1) // WIDTH):  # full tiles before it are out
            chunk = hashes[n * WIDTH : (n + 1) * WIDTH]
            yield tile_path(level, n, len(chunk)), b"".join(chunk), len(chunk) == WIDTH


@dataclass
class Published:
    url: str
    size: int
    previous_size: int
    written: int  # tiles and bundles written now
    checkpoint: str


def publish(run: Path, url: str, storage_options: dict[str, Any] | None = None, verify: bool = True) -> Published:
    """Publish the ledger of ``run`` up to its latest signed tree head to ``url`` (see the module docstring).

    ``verify``: verify the whole ledger first (the trainer, which has just written and signed it, skips
    this when it publishes at a checkpoint)."""
    from smalti.trust.note import Checkpoint, NoteError, Verifier, open_note
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.governance.ledger.verify import verify_ledger

    if verify:
        report = verify_ledger(run, in_progress=True)  # a run still training publishes what it has signed
        if not report.ok:
            raise PublishError(f"{run}: the ledger does not verify ({report.problem}); refusing to publish it")
    log = PublishedLog(url, storage_options)

    store = LedgerStore(ledger_path(run))
    try:
        heads, origin = store.heads(), store.origin
        public = store.trainer_key.raw
        if not heads:
            raise PublishError(f"{run}: no signed tree head yet; nothing to publish")
        head = heads[-1]
        leaves = store.leaves(stop=head.size)
        if merkle.root(leaves) != head.root:
            raise PublishError(f"{run}: the entries do not hash to the signed root at size {head.size}")
        previous, existing = 0, log.read("checkpoint", missing_ok=True)
        if existing is not None:
            try:
                old = Checkpoint.parse(open_note(existing.decode("utf-8"), [Verifier(origin, public)])[0])
            except (NoteError, UnicodeDecodeError) as error:
                raise PublishError(f"{url}/checkpoint: not this run's log ({origin}): {error}") from None
            if old.size > head.size or merkle.root(leaves[: old.size]) != old.root:
                raise PublishError(
                    f"{url}/checkpoint: the published log at size {old.size} is not a prefix of this "
                    f"ledger (its root differs): refusing to rewrite published history"
                )
            previous = old.size
        written = 0
        for path, data, _ in tiles(leaves, lambda a, b: [row[3] for row in store.rows(a, b)], previous):
            found = log.read(path, missing_ok=True)
            if found == data:
                continue
            if found is not None:
                raise PublishError(f"{url}/{path}: holds other bytes than this ledger's; refusing to overwrite it")
            log.write(path, data)
            written += 1
    finally:
        store.close()
    note = head.note(public)
    log.write("checkpoint", note.encode())
    return Published(url, head.size, previous, written, note)


class PublishedLog:
    """A published tlog-tiles log read the way a client reads it: its checkpoint, and any subtree hash from
    the fewest tiles (a subtree of 2**k entries is one tile's 2**(k mod 8) hashes at level k // 8)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        try:
            self.fs, self.base = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as error:
            raise PublishError(f"{url}: {error}") from None
        self.url = url
        self._tiles: dict[str, bytes] = {}

    @overload
    def read(self, path: str, missing_ok: Literal[False] = False) -> bytes: ...

    @overload
    def read(self, path: str, missing_ok: bool) -> bytes | None: ...

    def read(self, path: str, missing_ok: bool = False) -> bytes | None:
        """The bytes at ``path`` (None if absent and ``missing_ok``)."""
        try:
            return self.fs.cat_file(f"{self.base.rstrip('/')}/{path}")
        except FileNotFoundError:
            if missing_ok:
                return None
            raise PublishError(f"{self.url}/{path}: not found") from None
        except OSError as error:
            raise PublishError(f"{self.url}/{path}: cannot read ({error})") from None

    def write(self, path: str, data: bytes) -> None:
        """Replace ``path`` whole: on a local disk a temporary file renamed into place (a reader never sees half
        a file); elsewhere one PUT (S3, an HTTP server)."""
        target = f"{self.base.rstrip('/')}/{path}"
        local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        try:
            if local:
                self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self.fs.pipe_file(f"{target}.tmp", data)
                self.fs.mv(f"{target}.tmp", target)
            else:
                self.fs.pipe_file(target, data)
        except (OSError, NotImplementedError) as error:
            raise PublishError(f"{self.url}/{path}: cannot write ({error})") from None

    def _hashes(self, level: int, index: int, count: int, size: int) -> list[bytes]:
        """``count`` hashes of ``level`` from ``index`` on, for a tree of ``size`` entries (one tile)."""
        tile, offset = divmod(index, WIDTH)
        width = min(WIDTH, size // WIDTH**level - tile * WIDTH)
        path = tile_path(level, tile, width)
        if path not in self._tiles:
            data = self.read(path)
            if len(data) != width * 32:
                raise PublishError(f"{self.url}/{path}: {len(data)} bytes, a tile of width {width} has {width * 32}")
            self._tiles[path] = data
        data = self._tiles[path]
        return [data[i * 32 : (i + 1) * 32] for i in range(offset, offset + count)]

    def range_hash(self, start: int, stop: int, size: int) -> bytes:
        """MTH(D[start:stop]) of the tree of ``size`` entries, for the ranges proofs use (aligned subtrees and
        their right edges)."""
        length = stop - start
        if length & (length - 1) == 0 and start % length == 0:
            k = length.bit_length() - 1
            level = k // 8
            return merkle.root(self._hashes(level, start // WIDTH**level, 1 << (k % 8), size))
        split = 1 << ((length - 1).bit_length() - 1)
        return merkle.node_hash(self.range_hash(start, start + split, size), self.range_hash(start + split, stop, size))

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 6962's PATH(index, D[size]), its nodes read from the tiles (tiles once read are kept)."""
        if not 0 <= index < size:
            raise PublishError(f"{self.url}: entry {index} is outside a tree of {size}")
        path: list[bytes] = []
        start, stop = 0, size
        while stop - start > 1:
            k = 1 << ((stop - start - 1).bit_length() - 1)
            if index < start + k:
                path.append(self.range_hash(start + k, stop, size))
                stop = start + k
            else:
                path.append(self.range_hash(start, start + k, size))
                start += k
        return path[::-1]

    def entry(self, index: int, size: int) -> bytes:
        """Entry ``index``'s bytes, from its bundle (bundles once read are kept)."""
        bundle, offset = divmod(index, WIDTH)
        width = min(WIDTH, size - bundle * WIDTH)
        path = tile_path("entries", bundle, width)
        if path not in self._tiles:
            self._tiles[path] = self.read(path)
        data, at = self._tiles[path], 0
        for _ in range(offset + 1):
            if at + 2 > len(data):
                raise PublishError(f"{self.url}/{path}: the bundle ends before entry {index}")
            (length,) = struct.unpack_from(">H", data, at)
            start, at = at + 2, at + 2 + length
        if at > len(data):
            raise PublishError(f"{self.url}/{path}: the bundle ends inside entry {index}")
        return data[start:at]

    def consistency_proof(self, first: int, size: int) -> list[bytes]:
        """RFC 6962's PROOF(first, D[size]), its nodes read from the tiles."""

        def sub(m: int, start: int, stop: int, complete: bool) -> list[bytes]:
            if m == stop - start:
                return [] if complete else [self.range_hash(start, stop, size)]
            k = 1 << ((stop - start - 1).bit_length() - 1)
            if m <= k:
                return sub(m, start, start + k, complete) + [self.range_hash(start + k, stop, size)]
            return sub(m - k, start + k, stop, False) + [self.range_hash(start, start + k, size)]

        return sub(first, 0, size, True)
