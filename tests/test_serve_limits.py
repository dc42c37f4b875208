"""What one signed-in auditor can make the service hold: a 20,000-entry ledger, read the ways that used to read it
whole (every tile, the contributions, the queries, the heatmap, the entropy), many times over, at once. The
service's memory must grow by a bounded amount the first time and not at all after (its caches are bounded LRUs;
nothing decoded is kept), and reports render one at a time and then come from the cache."""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from pathlib import Path

import pytest

from serve_helpers import make_audit_taxonomy, serving
from test_ledger import train

ENTRIES = 20_000


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
def test_memory_stays_bounded_however_a_long_ledger_is_read(governed, tmp_path):
    from ledger_factory import grow_ledger
    from smalti.trust.keys import SigningKey
    from smalti.governance.ledger.tiles import tile_index
    from smalti.serve.client import AuditClient

    runs = tmp_path / "runs"
    train(governed, runs / "long", train={"max_duration": "8ba"}, checkpoint={"interval": "4ba"})
    grow_ledger(runs / "long", ENTRIES, SigningKey.load(governed.key("trainer")))
    shutil.rmtree(runs / "long" / "checkpoints")  # nothing but the ledger: its cost is what is measured
    taxonomy = make_audit_taxonomy(governed, tmp_path)
    size = ENTRIES + 1
    with serving(runs, taxonomy, governed.trust) as (base, process):
        client = AuditClient(base, SigningKey.load(tmp_path / "keys" / "auditor.key"), timeout=600)
        info = client.json("/api/runs/long")
        layer, node = info["layers"][0], info["classes"][1]
        paths = [f"/api/runs/long/tile/0/{tile_index(n)}" for n in range(size // 256)]
        paths += [f"/api/runs/long/tile/entries/{tile_index(n)}" for n in range(0, size // 256, 7)]
        paths += [f"/api/runs/long/tile/1/000.p/{size // 256}", "/api/runs/long/contributions?start=19000&limit=500",
                  "/api/runs/long/contributions/summary", "/api/runs/long/contributions/summary?upto_step=12345",
                  f"/api/runs/long/audit/layer?name={layer}", f"/api/runs/long/audit/class?name={node}",
                  "/api/runs/long/audit/example?index=3", "/api/runs/long/entropy",
                  "/api/runs/long/proof/inclusion?step=17", "/api/runs/long/proof/consistency?first=100"]

        def read_all() -> None:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                for path, answer in zip(paths, pool.map(client.get, paths)):
                    assert answer.status_code == 200, (path, answer.status_code, answer.text[:200])

        baseline = _rss_mb(process.pid)
        read_all()
        first = _rss_mb(process.pid)
        for _ in range(3):
            read_all()
        after = _rss_mb(process.pid)
        print(f"service memory: {baseline:.0f} MB at start, {first:.0f} MB after the first pass, {after:.0f} MB after "
              f"three more ({len(paths)} requests each, {ENTRIES} entries)")
        assert first - baseline < 150, "the first pass kept more than its bounded caches"
        assert after - first < 25, "repeating the same reads grew the service"

        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            reports = list(pool.map(client.get, ["/api/runs/long/report"] * 4))
        assert all(r.status_code == 200 for r in reports)
        assert len({r.text for r in reports}) == 1  # one rendering, shared
        again = time.perf_counter()
        assert client.get("/api/runs/long/report").status_code == 200
        assert time.perf_counter() - again < (again - started) / 4  # cached, not rendered again
