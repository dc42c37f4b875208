"""ledger_publish: how fast a ledger is published as a C2SP tlog-tiles log.

A ledger of realistic step entries (``ledgers.build_ledger``: about 2.7 kB each, a signed head every 1,000) is
published whole, as ``smalti ledger publish RUN --to DEST`` does it (the ledger verified first, the destination
checked for a prefix of this history, then every tile, bundle and the checkpoint written), to two destinations:
a local folder, and a loopback HTTP server that accepts PUT (``tests/put_server.py``). Each run publishes to a
fresh destination.

- ``entries_per_s``: entries / seconds of the slower destination, median of the runs. Goal: >= 1,000.
- ``ratio``: publishing / writing the same files with no checking at all (``baseline``: plain file writes, or
  one PUT per file over one ``requests`` session), slower destination, medians of the same runs: what the
  verification and the prefix check cost on top of moving the bytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import requests
from common import emit, machine
from ledgers import build_ledger, put_server

from smalti.trust.keys import SigningKey
from smalti.governance.ledger.tiles import publish


def written_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def baseline(files: dict[str, bytes], destination: str) -> float:
    """Seconds to write ``files`` to ``destination`` with nothing checked: the floor any publisher pays."""
    started = time.perf_counter()
    if destination.startswith("http"):
        with requests.Session() as session:
            for path, data in files.items():
                session.put(f"{destination}/{path}", data=data).raise_for_status()
    else:
        for path, data in files.items():
            target = Path(destination, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    key = SigningKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_ledger(root / "run", args.entries, key)
        times: dict[str, list[float]] = {"folder": [], "http": []}
        floors: dict[str, list[float]] = {"folder": [], "http": []}
        with put_server(root / "served") as base:
            for run in range(args.runs):
                for kind, destination in (("folder", str(root / f"published-{run}")), ("http", f"{base}/log-{run}")):
                    started = time.perf_counter()
                    done = publish(root / "run", destination)
                    times[kind].append(time.perf_counter() - started)
                    assert done.size == args.entries, done
                files = written_files(root / f"published-{run}")
                floors["folder"].append(baseline(files, str(root / f"copy-{run}")))
                floors["http"].append(baseline(files, f"{base}/copy-{run}"))
        medians = {kind: statistics.median(values) for kind, values in times.items()}
        slower = max(medians, key=lambda kind: medians[kind])
    emit({
        "benchmark": "ledger_publish",
        "entries_per_s": round(args.entries / medians[slower]),
        "goal": ">= 1000",
        "ratio": round(medians[slower] / statistics.median(floors[slower]), 3),
        "slower": slower,
        "folder_entries_per_s": round(args.entries / medians["folder"]),
        "http_entries_per_s": round(args.entries / medians["http"]),
        "runs_seconds": {kind: [round(t, 3) for t in values] for kind, values in times.items()},
        "baseline_seconds": {kind: round(statistics.median(values), 3) for kind, values in floors.items()},
        "files": len(files),
        "entries": args.entries,
        "runs": args.runs,
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
