"""Ledger verification speed: entries checked per second on a 100k-entry ledger.

The ledger is written with the real encoder and store: step entries shaped
like the baby GPT's (27 layers, 3 classes per step; about 2.7 kB each with
the packed tables of entry format 2, 5.5 kB in format 1), a signed tree head
every 1,000 entries and a final one. ``smalti ledger verify``'s check (every
leaf, the hash chain, the tree and every signature) is then timed; median of
several runs. Goal: >= 100,000 entries/s.

Verification runs as ``smalti ledger verify`` does by default: worker
processes, one per core, each reading and hashing spans of the ledger
(``workers``); ``one_process_entries_per_s`` is the same check in one process,
timed in the same runs.

The same run also times SHA-256 alone over the same entry bytes, already in
memory, on one core (``sha256_entries_per_s``): no single process can beat it,
since every leaf must be rehashed, so ``of_sha256_bound`` (rate / (bound x
workers)) says how close verification comes to what the cores could hash.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

from common import emit, machine
from ledgers import build_ledger

from smalti.trust.keys import SigningKey
from smalti.governance.ledger.store import LedgerStore, ledger_path
from smalti.governance.ledger.verify import default_workers, verify_ledger


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="worker processes (default: one per core, as `smalti ledger verify`)")
    args = parser.parse_args()
    key = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        build_ledger(Path(tmp), args.entries, key)
        size = ledger_path(tmp).stat().st_size
        store = LedgerStore(ledger_path(tmp))
        entries = [data for _, _, _, data in store.rows()]
        store.close()
        rates, alone, bounds = [], [], []
        for _ in range(args.runs):
            started = time.perf_counter()
            for data in entries:
                hashlib.sha256(b"\x00" + data).digest()
            bounds.append(args.entries / (time.perf_counter() - started))
            for workers, into in ((args.workers, rates), (1, alone)):
                started = time.perf_counter()
                report = verify_ledger(tmp, key.public, workers=workers)
                into.append(args.entries / (time.perf_counter() - started))
                assert report.ok and report.entries == args.entries, report.problem
    emit({
        "benchmark": "ledger_verify",
        "entries_per_s": round(statistics.median(rates)),
        "goal": ">= 100000",
        "runs_entries_per_s": [round(r) for r in rates],
        "workers": args.workers,
        "one_process_entries_per_s": round(statistics.median(alone)),
        "sha256_entries_per_s": round(statistics.median(bounds)),
        "of_sha256_bound": round(statistics.median(rates) / (statistics.median(bounds) * args.workers), 3),
        "entry_bytes": round(sum(map(len, entries)) / len(entries)),
        "entries": args.entries,
        "ledger_bytes": size,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
