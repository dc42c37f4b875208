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

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tessera.governance.keys import PublicKey
from tessera.governance.ledger import merkle
from tessera.governance.ledger.entry import HEADER_SIZE, MAGIC, ZERO_HASH, EntryFormatError, decode_entry
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
    head_at = {h.size: h for h in heads}
    frontier = merkle.Frontier()
    previous_leaf, previous_head_size, last_step = ZERO_HASH, 0, 0
    sha256, leaf_prefix = hashlib.sha256, b"\x00"

    def check_head(size: int) -> str | None:
        head = head_at[size]
        if frontier.root() != head.root:
            return (f"tree head at size {size}: its signed root does not match entries {previous_head_size}.."
                    f"{size - 1} (an entry in that range was changed, inserted or removed)")
        if head.key_id != public_key.key_id or not public_key.verify(head.signature, head.message()):
            return f"tree head at size {size}: signature is not valid for trainer key {public_key.key_id}"
        return None

    for position, (index, step, stored_leaf, data) in enumerate(store.rows()):
        where = f"entry {position} (step {step})"
        if index != position:
            report.problem = f"entry {position}: missing; the next stored index is {index} (entries deleted)"
            return report
        if data[:4] != MAGIC or len(data) < HEADER_SIZE:
            report.problem = f"{where}: not a ledger entry (bad header)"
            return report
        if int.from_bytes(data[4:12], "big") != index:
            report.problem = f"{where}: its header says index {int.from_bytes(data[4:12], 'big')} (moved or reordered)"
            return report
        if data[12:44] != previous_leaf:
            report.problem = f"{where}: hash chain broken (the entry before it was changed, removed or reordered)"
            return report
        leaf = sha256(leaf_prefix + data).digest()
        if leaf != stored_leaf:
            report.problem = f"{where}: content does not match its leaf hash (edited after it was written)"
            return report
        if deep:
            try:
                body = decode_entry(data).body
            except EntryFormatError as error:
                report.problem = f"{where}: {error}"
                return report
            if (index == 0) != (body["kind"] == "run"):
                report.problem = f"{where}: entry 0 must describe the run and only entry 0 may"
                return report
            if index > 0 and (body.get("step") != step or body["step"] <= last_step):
                report.problem = f"{where}: step {body.get('step')} out of order or not the stored step"
                return report
            last_step = body.get("step", 0)
        frontier.append(leaf)
        previous_leaf = leaf
        if frontier.size in head_at:
            problem = check_head(frontier.size)
            if problem:
                report.problem = problem
                return report
            previous_head_size = frontier.size
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
