"""data_throughput: the streaming loader (verification on) against a raw pyarrow scan of the same shards.

Prepares the Shakespeare dataset (keys, signed taxonomy, signed manifest),
serves it from a real HTTP server on loopback, and reads the train split
through Smalti's loader: shard cache, fail-closed verification,
deterministic block-shuffled order. The first pass (epoch 0, timed with the
loader's setup) downloads and verifies every shard once; each later pass (a
new epoch, a new order) reads every shard back from the verified cache and
decodes it again, since the loader keeps at most two decoded shards in
memory (of 4 or more). The baseline scans the same shard files with
``pyarrow.parquet.read_table`` (the tokens column, the payload both must
decode) and converts the tokens to numpy, alternating with the loader's passes.

Reports ``ratio`` = median loader samples/s over the warm passes / median raw
samples/s (goal >= 0.9) for batches of 512 examples (32k tokens, a usual LM
batch), the same for batches of 64 (``ratio_batch64``: per-batch Python
bookkeeping weighs more there), the cold first pass, and the one-time
verification cost per GB.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from common import emit, free_port, governed_shakespeare, machine

from smalti.data.lm import OrderConfig, dataset_data
from smalti.data.manifest import ShardEntry, verify_shard
from smalti.data.shards import CacheConfig
from smalti.trust.keys import PublicKey
from smalti.trust.taxonomy import Taxonomy

BATCH_SIZES = (64, 512)  # samples of 64 tokens: 4k and 32k tokens per batch


def wait_for_port(port: int, seconds: float = 30.0) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"HTTP server on port {port} did not start")


def open_loader(url: str, taxonomy: Taxonomy, cache: Path, batch_size: int):
    """The loader a run would build: verification on, the fewest decoded shards in memory (2)."""
    order = OrderConfig(global_batch_size=batch_size, seed=1, shuffle_block_shards=1)
    return dataset_data(url, taxonomy, 64, order, cache=CacheConfig(cache, 10**9), verify="lazy", memory_shards=2)


def loader_pass(data, epochs: range) -> tuple[float, int]:
    """``epochs`` of the train split: every shard read from the cache, decoded, and batched, each epoch anew."""
    started = time.perf_counter()
    samples = 0
    for epoch in epochs:
        for batch in data.train_batches(epoch, 0):
            samples += batch.num_samples
    return time.perf_counter() - started, samples


def raw_pass(paths: list[Path], repeats: int = 1) -> tuple[float, int]:
    started = time.perf_counter()
    rows = 0
    for path in paths * repeats:
        # the payload on one thread, memory-mapped, as the loader decodes it (smalti.data.manifest.read_parquet)
        table = pq.read_table(path, columns=["tokens"], memory_map=True, use_threads=False, pre_buffer=False)
        tokens = table.column("tokens").combine_chunks().values.to_numpy(zero_copy_only=False)
        rows += len(tokens) // 65
    return time.perf_counter() - started, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--passes", type=int, default=7, help="timed passes per batch size (default 7)")
    parser.add_argument("--epochs-per-pass", type=int, default=10,
                        help="epochs in one timed pass (default 10: a pass of one epoch lasts ~50 ms, too short "
                             "for two runs to agree)")
    parser.add_argument("--shard-examples", type=int, default=20_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        governed = governed_shakespeare(root, args.shard_examples)
        taxonomy = Taxonomy.load(governed.taxonomy, PublicKey.load(governed.trust))
        dataset = governed.dataset
        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                                   "--directory", str(dataset)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(port)
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()
            cold = open_loader(url, taxonomy, root / "cache", BATCH_SIZES[0])
            _, samples = loader_pass(cold, range(1))  # downloads and verifies every shard
            cold_seconds = time.perf_counter() - started
            train_shards = sorted(dataset.glob("train-*.parquet"))
            results, spread = {}, {}
            for batch_size in BATCH_SIZES:
                data = open_loader(url, taxonomy, root / "cache", batch_size)
                warm, raw = [], []
                for run in range(args.passes):
                    first = 1 + run * args.epochs_per_pass
                    seconds, read = loader_pass(data, range(first, first + args.epochs_per_pass))
                    warm.append(read / seconds)
                    raw_seconds, raw_rows = raw_pass(train_shards, args.epochs_per_pass)
                    raw.append(raw_rows / raw_seconds)
                results[batch_size] = (statistics.median(warm), statistics.median(raw))
                spread[batch_size] = (warm, raw)
        finally:
            server.terminate()
            server.wait()

        manifest = json.loads((dataset / "manifest.json").read_text())
        entries = [ShardEntry.from_json(split, s) for split in manifest["splits"] for s in manifest["splits"][split]["shards"]]
        started = time.perf_counter()
        total_bytes = 0
        for entry in entries:
            data = (dataset / entry.name).read_bytes()
            total_bytes += len(data)
            verify_shard(data, entry, str(dataset))
        verify_seconds = time.perf_counter() - started

    headline, headline_raw = results[BATCH_SIZES[-1]]
    small, small_raw = results[BATCH_SIZES[0]]
    emit({
        "benchmark": "data_throughput",
        "ratio": round(headline / headline_raw, 4),
        "goal": ">= 0.9",
        "batch_size": BATCH_SIZES[-1],
        "loader_samples_per_s": round(headline),
        "loader_tokens_per_s": round(headline * 64),
        "raw_samples_per_s": round(headline_raw),
        "ratio_batch64": round(small / small_raw, 4),
        "loader_samples_per_s_batch64": round(small),
        "raw_samples_per_s_batch64": round(small_raw),
        "cold_first_pass_samples_per_s": round(samples / cold_seconds),
        "verify_seconds_per_gb": round(verify_seconds / (total_bytes / 1e9), 1),
        "shard_bytes": total_bytes,
        "samples_per_pass": samples,
        "passes": args.passes,
        "epochs_per_pass": args.epochs_per_pass,
        "runs_ratio": [round(w / r, 4) for w, r in zip(*spread[BATCH_SIZES[-1]])],
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
