"""Checking a ledger from scratch: every entry, the chain, the tree and every signed tree head.

Nothing stored is trusted: leaf hashes are recomputed from the entry bytes,
roots from the leaves, and signatures against the key the auditor names
(``--pubkey``; by default the trainer key the ledger records, which proves
integrity but not authorship, and ``verify`` says so).

The first failure is reported with its place: an entry whose bytes no longer
match its stored leaf hash (edited in place), a break in the index sequence
or hash chain (deleted, inserted or reordered), a tree head whose root does
not match the entries (edited and re-hashed: the head names the range since
the previous good head), a forged or foreign signature, entries no head
covers, or a ledger whose last head is not the final one (cut short).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

from tessera.governance.keys import PublicKey
from tessera.governance.ledger import merkle
from tessera.governance.ledger.entry import HEADER_SIZE, MAGICS, ZERO_HASH, EntryFormatError, TreeHead, decode_entry
from tessera.governance.ledger.store import LedgerStore, ledger_path


@dataclass
class VerifyReport:
    ok: bool
    entries: int = 0
    heads: int = 0
    problem: str | None = None
    key_id: str | None = None
    key_source: str = ""
    last_head: dict | None = None


def verify_ledger(run_dir: str | Path, public_key: PublicKey | None = None, deep: bool = False) -> VerifyReport:
    """Recompute everything; ``deep`` also parses every entry (canonical JSON, kinds, step order)."""
    path = ledger_path(run_dir)
    store = LedgerStore(path)
    try:
        return _verify(store, public_key, deep)
    finally:
        store.close()


CHUNK = 4096  # entries read, hashed and checked together


def _hash_leaves(rows: list[tuple[int, int, bytes, bytes]]) -> list[bytes]:
    # One thread: on the 2-vCPU build machine a thread pool hashing ahead made verification slower
    # (46k vs 53k entries/s), the reader and the hashers contending for the GIL and the cores.
    return [merkle.leaf_hash(data) for _, _, _, data in rows]


def _verify(store: LedgerStore, public_key: PublicKey | None, deep: bool) -> VerifyReport:
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

    heads = store.heads()
    report.heads = len(heads)
    walk = _Walk({h.size: h for h in heads}, public_key, deep)
    for rows in store.row_chunks(CHUNK):
        problem = walk.chunk(rows, _hash_leaves(rows))
        if problem:
            report.problem = problem
            return report
    frontier = walk.frontier
    report.entries = frontier.size
    beyond = [h.size for h in heads if h.size > frontier.size]
    if beyond:
        report.problem = (f"tree head at size {beyond[0]}: the ledger has only {frontier.size} entries "
                          "(entries were removed from the end)")
        return report
    if not heads:
        report.problem = "no signed tree head: nothing vouches for these entries"
        return report
    if heads[-1].size != frontier.size:
        report.problem = (f"entries {heads[-1].size}..{frontier.size - 1} are not covered by a signed tree head "
                          "(appended after the last checkpoint: a crashed run, or added by hand)")
        return report
    if not heads[-1].final:
        report.problem = (f"the last tree head (size {heads[-1].size}) is not the final one: training did not "
                          "finish, or the ledger was cut short")
        return report
    report.ok = True
    report.last_head = heads[-1].to_json()
    return report


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
        if not self.deep and self._clean(rows, leaves):
            start, position = self.frontier.size, 0
            for size in self.head_sizes[bisect.bisect_right(self.head_sizes, start):]:
                if size > start + len(leaves):
                    break
                self.frontier.extend(leaves[position:size - start])
                position = size - start
                problem = self._check_head(size)
                if problem:
                    return problem
            self.frontier.extend(leaves[position:])
            self.previous_leaf = leaves[-1]
            return None
        return self._entry_by_entry(rows, leaves)

    def _clean(self, rows: list[tuple[int, int, bytes, bytes]], leaves: list[bytes]) -> bool:
        start = self.frontier.size
        if rows[0][0] != start or rows[-1][0] != start + len(rows) - 1:  # idx is unique and ordered
            return False
        if leaves != [stored for _, _, stored, _ in rows]:
            return False
        links = [self.previous_leaf] + leaves[:-1]
        return all(data[:4] in MAGICS and data[4:44] == (start + k).to_bytes(8, "big") + link
                   for k, ((_, _, _, data), link) in enumerate(zip(rows, links)))

    def _check_head(self, size: int) -> str | None:
        head = self.head_at[size]
        if self.frontier.root() != head.root:
            return (f"tree head at size {size}: its signed root does not match entries {self.previous_head_size}.."
                    f"{size - 1} (an entry in that range was changed, inserted or removed)")
        if head.key_id != self.public_key.key_id or not self.public_key.verify(head.signature, head.message()):
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
                problem = self._check_head(self.frontier.size)
                if problem:
                    return problem
        return None
