"""Shared by the ledger benchmarks: a long ledger of realistic entries in seconds, the Go project's tlog
client, and a loopback HTTP server that accepts PUT (what `smalti ledger publish --to http://...` writes to)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from smalti.trust import merkle  # noqa: E402
from smalti.trust.entry import ZERO_HASH, TreeHead, encode_entry  # noqa: E402
from smalti.trust.keys import SigningKey  # noqa: E402
from smalti.governance.ledger.store import LedgerStore, ledger_path  # noqa: E402

LAYERS, CLASSES = 27, ["gutenberg/tragedy/hamlet", "gutenberg/comedy/tempest", "gutenberg/history/henry_v"]
GOPATH = "/usr/share/gocode"  # where Debian's golang-golang-x-mod-dev puts golang.org/x/mod


def step_body(step: int, rng: random.Random) -> dict:
    """A step entry shaped like the baby GPT's: 27 layers, 3 classes (about 2.7 kB encoded)."""
    return {
        "kind": "step", "step": step, "time": {"batch": step, "epoch": 0, "sample": 12 * step, "token": 768 * step},
        "loss": rng.random() * 4, "examples": {c: [rng.randrange(10**6) for _ in range(4)] for c in CLASSES},
        "dropped": [], "counts": {c: 4 for c in CLASSES}, "skipped": False,
        "fingerprints": {"policy": "ab" * 32, "taxonomy": "cd" * 32, "dataset": "ef" * 32},
        "layers": [[1] + [rng.random() for _ in range(5)] for _ in range(LAYERS)],
        "contributions": {c: [[j, rng.random(), rng.random()] for j in range(LAYERS)] for c in CLASSES},
    }


def build_ledger(run_dir: Path, entries: int, key: SigningKey, head_every: int = 1000) -> str:
    """A ledger of ``entries`` (the real encoder and store; a signed head every ``head_every`` entries and a final
    one) under ``run_dir``. Returns the log's origin (what its checkpoints and verifier key are named by)."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    store = LedgerStore(ledger_path(run_dir), create=True)
    origin = store.start_log(key.public)
    rng, frontier, previous, rows = random.Random(0), merkle.Frontier(), ZERO_HASH, []
    template = [step_body(s, rng) for s in range(1, 101)]  # encode real bodies; vary the step
    for index in range(entries):
        content = dict(template[index % 100], step=index) if index else {"kind": "run"}
        data = encode_entry(index, previous, content)
        leaf = merkle.leaf_hash(data)
        rows.append((index, index, leaf, data))
        frontier.append(leaf)
        previous = leaf
        if frontier.size % head_every == 0 or index == entries - 1:
            store.append(rows, TreeHead.signed(key, origin, frontier.size, frontier.root(), index == entries - 1,
                                               timestamp="2026-01-01T00:00:00+00:00"))
            rows = []
    store.close()
    return origin


def go_tlog_client(folder: Path) -> Path:
    """tests/interop/c2sp_check.go built into ``folder``: golang.org/x/mod/sumdb/{note,tlog}, not Smalti's code."""
    if shutil.which("go") is None or not Path(GOPATH, "src/golang.org/x/mod/sumdb/tlog").is_dir():
        raise SystemExit("needs Go and golang.org/x/mod (make go-interop)")
    binary = folder / "c2sp_check"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "", "GOCACHE": str(folder / "gocache")}
    built = subprocess.run(["go", "build", "-o", str(binary), str(REPO / "tests/interop/c2sp_check.go")],
                           capture_output=True, text=True, env=env, cwd=folder)
    if built.returncode != 0:
        raise SystemExit(f"go build: {built.stderr[-2000:]}")
    return binary


@contextlib.contextmanager
def put_server(folder: Path) -> Iterator[str]:
    """tests/put_server.py on a free loopback port, serving and accepting PUT into ``folder``; its base URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, str(REPO / "tests/put_server.py"), str(port), str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise SystemExit("the PUT server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
