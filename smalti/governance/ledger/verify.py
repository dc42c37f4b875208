"""Checking a ledger from scratch: every entry, the chain, the tree and every signed tree head.

Nothing stored is trusted: leaf hashes are recomputed from the entry bytes,
roots from the leaves, and signatures against the key the auditor names
(``--pubkey``; by default the trainer key the ledger records, which proves
integrity but not authorship, and ``verify`` says so).

**Parallel.** Rehashing every entry is most of the work, and it splits: on
Linux, a ledger longer than one span (:data:`SPAN` entries) is read and
hashed by worker processes, one span each (``workers``: by default one per
core the process may use), each also checking that its span holds together
(indexes, headers, stored leaves, chain links). The parent joins the spans
(each span's first link must be the previous span's last leaf), builds the
tree and checks every signed head, in order. A span that does not hold
together is never trusted: from there the parent walks entry by entry itself,
so the problem named is exactly the one a single process names.

The first failure is reported with its place: an entry whose bytes no longer
match its stored leaf hash (edited in place), a break in the index sequence
or hash chain (deleted, inserted or reordered), a tree head whose root does
not match the entries (edited and re-hashed: the head names the range since
the previous good head), a forged or foreign signature, entries no head
covers, or a ledger whose last head is not the final one (cut short).
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from smalti.trust.keys import PublicKey
from smalti.trust import merkle
from smalti.trust.entry import HEADER_SIZE, MAGICS, ZERO_HASH, EntryFormatError, TreeHead, decode_entry
from smalti.governance.ledger.store import LedgerStore, ledger_path


@dataclass
class VerifyReport:
    ok: bool
    entries: int = 0
    heads: int = 0
    problem: str | None = None
    key_id: str | None = None
    key_source: str = ""
    last_head: dict | None = None


def verify_ledger(
    run_dir: str | Path,
    public_key: PublicKey | None = None,
    deep: bool = False,
    workers: int | None = None,
    in_progress: bool = False,
    read_only: bool = False,
) -> VerifyReport:
    """Recompute everything; ``deep`` also parses every entry (canonical JSON, kinds, step order).

    ``in_progress``: a run that may still be training; its last head need not be final, and entries
    after it (committed since the last checkpoint, not yet signed) are checked but vouch for nothing.

    ``workers``: processes that read and hash spans of the ledger (default: one per usable core;
    1, ``deep`` or a platform without ``fork`` checks in this process alone).
    """
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    path = ledger_path(run_dir)
    store = LedgerStore(path, read_only=read_only)
    try:
        return _verify(store, public_key, deep, default_workers() if workers is None else workers, in_progress)
    finally:
        store.close()


CHUNK = 4096  # entries read, hashed and checked together
SPAN = 8192  # entries one worker process reads, hashes and checks (about 21 MB of baby-GPT entries)


def default_workers() -> int:
    """One per core this process may run on (threads do not help: measured 1.1x on two cores, processes 2x)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _hash_leaves(rows: list[tuple[int, int, bytes, bytes]]) -> list[bytes]:
    return [merkle.leaf_hash(data) for _, _, _, data in rows]


def _holds_together(
    rows: list[tuple[int, int, bytes, bytes]], leaves: list[bytes], start: int, previous_leaf: bytes
) -> bool:
    """Whether ``rows`` are entries start.. in order, each matching its stored leaf and chained to the one before.

    Checked with a few list operations; a False sends the verifier entry by entry to say what is wrong.
    """
    if not rows or rows[0][0] != start or rows[-1][0] != start + len(rows) - 1:  # idx is unique and ordered
        return False
    if leaves != [stored for _, _, stored, _ in rows]:
        return False
    links = [previous_leaf] + leaves[:-1]
    return all(
        data[:4] in MAGICS and data[4:44] == (start + k).to_bytes(8, "big") + link
        for k, ((_, _, _, data), link) in enumerate(zip(rows, links))
    )


@dataclass
class _Span:
    """What a worker reports on entries [start, stop) that hold together on their own (complete, headers right,
    stored leaves match, chained inside): enough for the parent to join them without the leaves."""

    first_link: bytes  # the first entry's chain link: must be the previous span's last leaf
    last_leaf: bytes
    heads: dict[int, list[tuple[int, bytes]]]  # each signed head inside the span: the span's subtrees up to it
    subtrees: list[tuple[int, bytes]]  # the whole span's


def _hash_span(task: tuple[str, int, int, list[int]]) -> _Span | None:
    """In a worker: read, hash and check one span of entries, and build its part of the tree (None: it does not
    hold together)."""
    path, start, stop, head_sizes = task
    store = LedgerStore(path)
    try:
        rows = list(store.rows(start, stop))
    finally:
        store.close()
    leaves = _hash_leaves(rows)
    first_link = rows[0][3][12:44] if rows else b""
    if len(rows) != stop - start or not _holds_together(rows, leaves, start, first_link):
        return None
    tree, heads, position = merkle.Frontier(), {}, 0
    for size in head_sizes:  # those inside the span, ascending
        tree.extend(leaves[position : size - start])
        position = size - start
        heads[size] = tree.subtrees
    tree.extend(leaves[position:])
    return _Span(first_link, leaves[-1], heads, tree.subtrees)


def _spans(
    store: LedgerStore, workers: int, deep: bool, head_sizes: list[int]
) -> list[tuple[str, int, int, list[int]]]:
    """The spans to hand to worker processes, or none where one process should do it all."""
    if workers < 2 or deep or sys.platform != "linux":  # fork: workers start in milliseconds, importing nothing
        return []
    try:
        low, high = store.db.execute("SELECT MIN(idx), MAX(idx) FROM entries").fetchone()
    except sqlite3.DatabaseError:  # a damaged file: the walk in this process finds and names the place
        return []
    if low != 0 or high is None or high < SPAN:  # nothing to split, or a gap at the start the walk must name
        return []
    spans = []
    for start in range(0, high + 1, SPAN):
        stop = min(start + SPAN, high + 1)
        spans.append((str(store.path), start, stop, [size for size in head_sizes if start < size <= stop]))
    return spans


def _verify(
    store: LedgerStore, public_key: PublicKey | None, deep: bool, workers: int, in_progress: bool = False
) -> VerifyReport:
    report = VerifyReport(ok=False)
    if public_key is None:
        recorded = store.get_meta("trainer_public_key")
        if recorded is None:
            report.problem = "no --pubkey given and the ledger records no trainer key"
            return report
        public_key = PublicKey.parse(recorded, "ledger meta trainer_public_key")
        report.key_source = "the key recorded in the ledger (pass --pubkey to check who signed it)"
    else:
        report.key_source = "--pubkey"
    report.key_id = public_key.key_id

    try:
        heads = store.heads()
    except sqlite3.DatabaseError as error:
        report.problem = f"the signed tree heads cannot be read: the SQLite file is damaged ({error})"
        return report
    report.heads = len(heads)
    walk = _Walk({h.size: h for h in heads}, public_key, deep)
    problem = _walk_spans(walk, _spans(store, workers, deep, walk.head_sizes), workers)
    try:
        if problem is None:  # the rest in this process: all of it without workers (from 0 so stray rows show)
            for rows in store.row_chunks(CHUNK, start=walk.frontier.size or None):
                problem = walk.chunk(rows, _hash_leaves(rows))
                if problem:
                    break
    except sqlite3.DatabaseError as error:
        problem = (
            f"entries from {walk.frontier.size} on cannot be read: the SQLite file is damaged ({error}); "
            "the entries before them check out"
        )
    if problem:
        report.problem = problem
        return report
    frontier = walk.frontier
    report.entries = frontier.size
    beyond = [h.size for h in heads if h.size > frontier.size]
    if beyond:
        report.problem = (
            f"tree head at size {beyond[0]}: the ledger has only {frontier.size} entries "
            "(entries were removed from the end)"
        )
        return report
    if not heads:
        report.problem = "no signed tree head: nothing vouches for these entries"
        return report
    if heads[-1].size != frontier.size and not in_progress:
        report.problem = (
            f"entries {heads[-1].size}..{frontier.size - 1} are not covered by a signed tree head "
            "(appended after the last checkpoint: a crashed run, or added by hand)"
        )
        return report
    if not heads[-1].final and not in_progress:
        report.problem = (
            f"the last tree head (size {heads[-1].size}) is not the final one: training did not "
            "finish, or the ledger was cut short"
        )
        return report
    report.ok = True
    report.last_head = heads[-1].to_json()
    return report


def _walk_spans(walk: _Walk, spans: list[tuple[str, int, int, list[int]]], workers: int) -> str | None:
    """Join the spans the workers check, in order, up to the first that does not hold together."""
    if not spans:
        return None
    context = multiprocessing.get_context("fork")
    with context.Pool(min(workers, len(spans))) as pool:
        try:
            for span in pool.imap(_hash_span, spans):  # in order; spans are contiguous: each starts at the walk
                if span is None or span.first_link != walk.previous_leaf:
                    return None  # the parent walks from here entry by entry and names what is wrong
                problem = walk.graft(span)
                if problem:
                    return problem
        except sqlite3.DatabaseError:  # a damaged file: the parent reads on from here and says where
            return None
    return None


class _Walk:
    """The verifier's position in the ledger: the tree so far, the last leaf, the last good head.

    A chunk is first checked whole (headers, chain links and stored leaves compared in a few list
    operations, the tree extended a level at a time); only a chunk that fails, or ``--deep``, is
    walked entry by entry, which is what names the first bad entry and what is wrong with it.
    """

    def __init__(self, head_at: dict[int, TreeHead], public_key: PublicKey, deep: bool) -> None:
        self.head_at, self.public_key, self.deep = head_at, public_key, deep
        self.head_sizes = sorted(head_at)
        self.frontier = merkle.Frontier()
        self.previous_leaf, self.previous_head_size, self.last_step = ZERO_HASH, 0, 0

    def chunk(self, rows: list[tuple[int, int, bytes, bytes]], leaves: list[bytes]) -> str | None:
        if not self.deep and _holds_together(rows, leaves, self.frontier.size, self.previous_leaf):
            return self.extend(leaves)
        return self._entry_by_entry(rows, leaves)

    def graft(self, span: _Span) -> str | None:
        """Add a span a worker checked and built, checking each signed head inside it."""
        for size, subtrees in span.heads.items():
            problem = self._check_head(size, self.frontier.grafted(subtrees).root())
            if problem:
                return problem
        self.frontier = self.frontier.grafted(span.subtrees)
        self.previous_leaf = span.last_leaf
        return None

    def extend(self, leaves: list[bytes]) -> str | None:
        """Add leaves already known to hold together, checking each signed head they reach."""
        start, position = self.frontier.size, 0
        for size in self.head_sizes[bisect.bisect_right(self.head_sizes, start) :]:
            if size > start + len(leaves):
                break
            self.frontier.extend(leaves[position : size - start])
            position = size - start
            problem = self._check_head(size, self.frontier.root())
            if problem:
                return problem
        self.frontier.extend(leaves[position:])
        self.previous_leaf = leaves[-1]
        return None

    def _check_head(self, size: int, root: bytes) -> str | None:
        head = self.head_at[size]
        if root != head.root:
            return (
                f"tree head at size {size}: its signed root does not match entries {self.previous_head_size}.."
                f"{size - 1} (an entry in that range was changed, inserted or removed)"
            )
        if head.key_id != self.public_key.key_id:  # name the key that did sign: a wrong --pubkey reads as such
            return (
                f"tree head at size {size}: signed by key {head.key_id}, not by trainer key "
                f"{self.public_key.key_id} (is --pubkey the trainer's?)"
            )
        if not self.public_key.verify(head.signature, head.message()):
            return f"tree head at size {size}: signature is not valid for trainer key {self.public_key.key_id}"
        self.previous_head_size = size
        return None

    def _entry_by_entry(self, rows: list[tuple[int, int, bytes, bytes]], leaves: list[bytes]) -> str | None:
        for (index, step, stored_leaf, data), leaf in zip(rows, leaves):
            position = self.frontier.size
            where = f"entry {position} (step {step})"
            if index != position:
                return f"entry {position}: missing; the next stored index is {index} (entries deleted)"
            if data[:4] not in MAGICS or len(data) < HEADER_SIZE:
                return f"{where}: not a ledger entry (bad header)"
            if int.from_bytes(data[4:12], "big") != index:
                return f"{where}: its header says index {int.from_bytes(data[4:12], 'big')} (moved or reordered)"
            if data[12:44] != self.previous_leaf:
                return f"{where}: hash chain broken (the entry before it was changed, removed or reordered)"
            if leaf != stored_leaf:
                return f"{where}: content does not match its leaf hash (edited after it was written)"
            if self.deep:
                try:
                    body = decode_entry(data).body
                except EntryFormatError as error:
                    return f"{where}: {error}"
                if (index == 0) != (body["kind"] == "run"):
                    return f"{where}: entry 0 must describe the run and only entry 0 may"
                if index > 0 and (body.get("step") != step or body["step"] <= self.last_step):
                    return f"{where}: step {body.get('step')} out of order or not the stored step"
                self.last_step = body.get("step", 0)
            self.frontier.append(leaf)
            self.previous_leaf = leaf
            if self.frontier.size in self.head_at:
                problem = self._check_head(self.frontier.size, self.frontier.root())
                if problem:
                    return problem
        return None
