"""tiles_verify: inclusion proofs verified per second by a third-party tlog client against published tiles.

A ledger of realistic entries (``ledgers.build_ledger``) is published with ``smalti ledger publish`` to a loopback
HTTP server (``tests/put_server.py``). The Go project's own client code (golang.org/x/mod/sumdb/tlog and note,
``tests/interop/c2sp_check.go prove-many``) then opens the signed checkpoint and proves and checks random entries:
each proof computed from the tiles (fetched over HTTP when first needed, authenticated against the checkpoint,
then kept, as a tlog client keeps them), checked against the entry's own bytes from its bundle. The time
includes every fetch.

- ``proofs_per_s``: the Go client's rate, median of the runs (a new client and seed each run).
- ``ratio``: that rate / the same count of proofs by Smalti's own reader of the same tiles
  (``PublishedLog.inclusion_proof`` and ``entry``, checked with ``smalti.trust.merkle``), timed in the same runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from common import emit, machine
from ledgers import build_ledger, go_tlog_client, put_server

from smalti.trust import merkle
from smalti.trust.keys import SigningKey
from smalti.trust.note import Checkpoint, Verifier, open_note, verifier_key
from smalti.governance.ledger.tiles import PublishedLog, publish


def smalti_reader(url: str, origin: str, key: SigningKey, count: int, seed: int) -> float:
    """Proofs per second by Smalti's own tile reader: the same work as the Go client's prove-many."""
    started = time.perf_counter()
    log = PublishedLog(url)
    head = Checkpoint.parse(open_note(log.read("checkpoint").decode(), [Verifier(origin, key.public.raw)])[0])
    rng = random.Random(seed)
    for _ in range(count):
        index = rng.randrange(head.size)
        leaf = merkle.leaf_hash(log.entry(index, head.size))
        if not merkle.verify_inclusion(index, head.size, leaf, log.inclusion_proof(index, head.size), head.root):
            raise SystemExit(f"entry {index}: Smalti's reader could not prove it")
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--proofs", type=int, default=20_000, help="proofs per run (default 20,000)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    key = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        origin = build_ledger(root / "run", args.entries, key)
        client = go_tlog_client(root)
        go_rates, ours, fetched = [], [], []
        with put_server(root / "served") as base:
            url = f"{base}/log"
            publish(root / "run", url)
            vkey = verifier_key(origin, key.public.raw)
            for run in range(args.runs):
                done = subprocess.run([str(client), "prove-many", url, vkey, str(args.proofs), str(run + 1)],
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"the Go client refused the published log: {done.stderr.strip()}")
                result = json.loads(done.stdout)
                go_rates.append(result["proofs_per_s"])
                fetched.append(result["tiles_fetched"])
                ours.append(smalti_reader(url, origin, key, args.proofs, run + 1))
    emit({
        "benchmark": "tiles_verify",
        "proofs_per_s": round(statistics.median(go_rates)),
        "ratio": round(statistics.median(go_rates) / statistics.median(ours), 3),
        "runs_proofs_per_s": [round(r) for r in go_rates],
        "smalti_reader_proofs_per_s": round(statistics.median(ours)),
        "tiles_fetched": fetched,
        "client": "golang.org/x/mod/sumdb/tlog (tests/interop/c2sp_check.go prove-many)",
        "entries": args.entries,
        "proofs": args.proofs,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
