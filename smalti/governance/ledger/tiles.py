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
from typing import Any, Callable, Iterator

import fsspec

from smalti.errors import SmaltiError
from smalti.governance.ledger import merkle

WIDTH = 256  # hashes per full tile, entries per full bundle (the spec's tile height of 8)
MAX_ENTRY = 0xFFFF  # entries are uint16 length-prefixed in bundles


class PublishError(SmaltiError):
    """A ledger that cannot be published to that destination, and why."""


def tile_index(n: int) -> str:
    """1234067 -> ``x001/x234/067``: three digits per element, every element but the last prefixed by x."""
    digits = f"{n:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[i:i + 3] for i in range(0, len(digits), 3)]
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
        hashes = [merkle.root(hashes[i:i + WIDTH]) for i in range(0, len(hashes) - WIDTH + 1, WIDTH)]


def tiles(leaves: list[bytes], entries: Callable[[int, int], list[bytes]],
          published: int = 0) -> Iterator[tuple[str, bytes, bool]]:
    """(path, bytes, full) of every tile and bundle a tree of ``len(leaves)`` entries needs that a tree of
    ``published`` entries did not already have as a full tile; ``entries(start, stop)`` reads entries."""
    start = published // WIDTH * WIDTH
    bundled = entries(start, len(leaves))
    for index, entry in enumerate(bundled, start):
        if len(entry) > MAX_ENTRY:
            raise PublishError(f"entry {index} has {len(entry)} bytes; tlog-tiles entry bundles hold at most "
                               f"{MAX_ENTRY} (uint16 lengths)")
    for n in range(start // WIDTH, (len(leaves) + WIDTH - 1) // WIDTH):
        chunk = bundled[n * WIDTH - start:(n + 1) * WIDTH - start]
        yield (tile_path("entries", n, len(chunk)), b"".join(struct.pack(">H", len(e)) + e for e in chunk),
               len(chunk) == WIDTH)
    for level, hashes in enumerate(level_hashes(leaves)):
        before = published // WIDTH ** level  # this level's hashes at the published size
        for n in range(before // WIDTH, (len(hashes) + WIDTH - 1) // WIDTH):  # full tiles before it are out
            chunk = hashes[n * WIDTH:(n + 1) * WIDTH]
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
    from smalti.governance.keys import PublicKey
    from smalti.governance.ledger.note import Checkpoint, NoteError, Verifier, open_note
    from smalti.governance.ledger.store import LedgerStore, ledger_path
    from smalti.governance.ledger.verify import verify_ledger

    if verify:
        report = verify_ledger(run, in_progress=True)  # a run still training publishes what it has signed
        if not report.ok:
            raise PublishError(f"{run}: the ledger does not verify ({report.problem}); refusing to publish it")
    try:
        fs, base = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ImportError, ValueError) as error:
        raise PublishError(f"--to {url}: {error}") from None
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

    def where(path: str) -> str:
        return f"{base.rstrip('/')}/{path}"

    def read(path: str) -> bytes | None:
        try:
            return fs.cat_file(where(path))
        except FileNotFoundError:
            return None
        except OSError as error:
            raise PublishError(f"{url}/{path}: cannot read ({error})") from None

    def write(path: str, data: bytes) -> None:
        target = where(path)
        try:
            if local:  # a temporary file renamed into place: a reader never sees half a file
                fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                fs.pipe_file(f"{target}.tmp", data)
                fs.mv(f"{target}.tmp", target)
            else:  # one PUT (S3, an HTTP server) replaces the object whole
                fs.pipe_file(target, data)
        except OSError as error:
            raise PublishError(f"{url}/{path}: cannot write ({error})") from None

    store = LedgerStore(ledger_path(run))
    try:
        heads, origin = store.heads(), store.origin
        public = PublicKey.parse(store.get_meta("trainer_public_key") or "", f"{run}: the ledger's trainer key").raw
        if not heads:
            raise PublishError(f"{run}: no signed tree head yet; nothing to publish")
        head = heads[-1]
        leaves = store.leaves(stop=head.size)
        if merkle.root(leaves) != head.root:
            raise PublishError(f"{run}: the entries do not hash to the signed root at size {head.size}")
        previous, existing = 0, read("checkpoint")
        if existing is not None:
            try:
                old = Checkpoint.parse(open_note(existing.decode("utf-8"), [Verifier(origin, public)])[0])
            except (NoteError, UnicodeDecodeError) as error:
                raise PublishError(f"{url}/checkpoint: not this run's log ({origin}): {error}") from None
            if old.size > head.size or merkle.root(leaves[:old.size]) != old.root:
                raise PublishError(f"{url}/checkpoint: the published log at size {old.size} is not a prefix of this "
                                   f"ledger (its root differs): refusing to rewrite published history")
            previous = old.size
        written = 0
        for path, data, _ in tiles(leaves, lambda a, b: [row[3] for row in store.rows(a, b)], previous):
            found = read(path)
            if found == data:
                continue
            if found is not None:
                raise PublishError(f"{url}/{path}: holds other bytes than this ledger's; refusing to overwrite it")
            write(path, data)
            written += 1
    finally:
        store.close()
    note = head.note(public)
    write("checkpoint", note.encode())
    return Published(url, head.size, previous, written, note)
