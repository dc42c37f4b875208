"""Long ledgers in seconds: a real run's step entries repeated with new step numbers, chained, hashed and signed
again by the trainer key, so that services and readers can be tested at 10,000+ entries without training that long.

The entries are the trainer's own (every field as it writes them); only the step numbers and the chain differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from smalti.trust.keys import SigningKey
from smalti.trust import merkle
from smalti.trust.entry import HEADER_SIZE, ZERO_HASH, TreeHead, encode_packed_entry
from smalti.governance.ledger.store import LedgerStore, ledger_path


def grow_ledger(run_dir: Path, steps: int, key: SigningKey, head_every: int = 1000,
                edit: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
                raw: Callable[[int, bytes], bytes] | None = None) -> int:
    """Rewrite ``run_dir``'s ledger with ``steps`` step entries cycled from its own; ``edit(index, packed_body)``
    may change any entry before it is encoded, and ``raw(index, bytes)`` the encoded bytes themselves (what a
    dishonest trainer would write, even what no JSON encoder would). Returns the size."""
    path = ledger_path(run_dir)
    store = LedgerStore(path)
    try:
        bodies = [json.loads(row[3][HEADER_SIZE:]) for row in store.rows()]
        meta = {k: store.get_meta(k) for k in ("format", "trainer_public_key", "origin")}
    finally:
        store.close()
    path.unlink()
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    run, templates = bodies[0], bodies[1:]
    store = LedgerStore(path, create=True)
    try:
        store.set_meta({k: v for k, v in meta.items() if v is not None})
        frontier, previous, rows = merkle.Frontier(), ZERO_HASH, []
        for index in range(steps + 1):
            body = run if index == 0 else dict(templates[(index - 1) % len(templates)], step=index)
            if edit is not None:
                body = edit(index, body)
            data = encode_packed_entry(index, previous, body)
            if raw is not None:
                data = raw(index, data)
            leaf = merkle.leaf_hash(data)
            rows.append((index, body.get("step", 0), leaf, data))
            frontier.append(leaf)
            previous = leaf
            final = index == steps
            if final or (index and index % head_every == 0):
                head = TreeHead.signed(key, meta["origin"], frontier.size, frontier.root(), final=final)
                store.append(rows, head)
                rows = []
    finally:
        store.close()
    return steps + 1
