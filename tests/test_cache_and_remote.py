"""The shard cache's rules, and datasets read from real HTTP and S3-compatible servers on loopback."""

import os

import pytest
import torch

from smalti.build import build_data
from smalti.data.cache import ShardCache
from smalti.distributed import DistInfo
from smalti.errors import DataError
from smalti.trainer import Trainer

from conftest import smalti_cli
from helpers import losses, recipe


def _payload(n: int, fill: int) -> bytes:
    return bytes([fill]) * n


def test_cache_never_exceeds_its_limit_and_evicts_least_recently_used(tmp_path):
    cache = ShardCache(tmp_path / "cache", limit_bytes=250)
    for name, fill in (("a", 1), ("b", 2)):
        data, verified = cache.read(name * 64, 100, lambda fill=fill: _payload(100, fill))
        assert not verified and data == _payload(100, fill)
        cache.unpin(name * 64)
    cache.mark_verified("a" * 64)
    data, verified = cache.read("a" * 64, 100, lambda: pytest.fail("a is cached: no download"))
    assert verified and data == _payload(100, 1)  # and a is now the most recently used
    cache.unpin("a" * 64)
    cache.read("c" * 64, 100, lambda: _payload(100, 3))
    assert cache.cached() == {"a" * 64, "c" * 64} and cache.used_bytes() <= 250
    assert not (tmp_path / "cache" / ("b" * 64 + ".shard")).exists()


def test_cache_never_evicts_a_shard_in_use_by_another_process_handle(tmp_path):
    reader = ShardCache(tmp_path / "cache", limit_bytes=200)
    reader.read("a" * 64, 100, lambda: _payload(100, 1))  # stays pinned by this handle
    other = ShardCache(tmp_path / "cache", limit_bytes=200)
    other.read("b" * 64, 100, lambda: _payload(100, 2))  # pinned by the other handle
    with pytest.raises(DataError, match="cached shards are in use"):
        ShardCache(tmp_path / "cache", limit_bytes=200).read("c" * 64, 100, lambda: _payload(100, 3))
    assert {"a" * 64, "b" * 64} == reader.cached()
    reader.close()
    third = ShardCache(tmp_path / "cache", limit_bytes=200)
    third.read("c" * 64, 100, lambda: _payload(100, 3))  # a is free now: evicted, b is still pinned
    assert third.cached() == {"b" * 64, "c" * 64}


def test_cache_never_deletes_files_it_did_not_download(tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    (folder / ("f" * 64 + ".shard")).write_bytes(b"not from the cache")
    cache = ShardCache(folder, limit_bytes=150)
    for name in "abc":
        cache.read(name * 64, 100, lambda: _payload(100, 7))
        cache.unpin(name * 64)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / ("f" * 64 + ".shard")).read_bytes() == b"not from the cache"


def test_cache_refetches_a_file_changed_behind_its_back(tmp_path):
    cache = ShardCache(tmp_path, limit_bytes=1000)
    cache.read("a" * 64, 100, lambda: _payload(100, 1))
    cache.unpin("a" * 64)
    (tmp_path / ("a" * 64 + ".shard")).write_bytes(_payload(100, 9))
    data, verified = cache.read("a" * 64, 100, lambda: _payload(100, 1))
    assert not verified and data == _payload(100, 1)


def test_cache_limit_smaller_than_a_shard_is_a_clear_error(governed, http_server):
    url = http_server(governed.dataset)
    config = recipe(governed.recipe(data={"url": url, "cache_limit": "1KB"}))
    with pytest.raises(DataError, match=r"cache limit of 1,000 bytes .* is smaller than shard train-0000\d\.parquet"):
        build_data(config, DistInfo())


def test_local_dataset_is_read_in_place_not_cached(governed, tmp_path):
    before = sorted(p.name for p in governed.dataset.iterdir())
    config = recipe(governed.recipe(data={"cache_dir": str(tmp_path / "cache"), "cache_limit": "1KB"}))
    build_data(config, DistInfo())  # a limit this small would fail if anything went through the cache
    assert sorted(p.name for p in governed.dataset.iterdir()) == before
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*.shard"))


def test_train_from_http_through_the_cache(governed, http_server, tmp_path):
    url = http_server(governed.dataset)
    cache_dir = tmp_path / "cache"
    config = recipe(governed.recipe(data={"url": url, "cache_dir": str(cache_dir), "cache_limit": "2MB"},
                                    train={"max_duration": "6ba"}))
    Trainer(config, tmp_path / "run").fit()
    assert len(losses(tmp_path / "run")) == 6
    cached = list(cache_dir.glob("*.shard"))
    assert cached and sum(p.stat().st_size for p in cached) <= 2_000_000
    local = recipe(governed.recipe(train={"max_duration": "6ba"}))
    Trainer(local, tmp_path / "local").fit()
    assert losses(tmp_path / "local") == losses(tmp_path / "run")  # same data, same order, same result


def test_prepare_to_s3_verify_and_train_from_it(governed, tiny_corpus, s3_server, tmp_path):
    options = ["--storage-option", f"endpoint_url={s3_server}"]
    prepared = smalti_cli(
        "data", "prepare", "--source", str(tiny_corpus), "--class-template", "gutenberg/{genre}/{work}",
        "--taxonomy", str(governed.taxonomy), "--trust", str(governed.trust), "--key", str(governed.key("tagger")),
        "--out", "s3://corpora/tiny", "--seq-len", "16", "--shard-examples", "200", *options,
        env={k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")},
    )
    assert prepared.returncode == 0, prepared.stderr
    assert "signed by tagger" in prepared.stdout
    verified = smalti_cli("data", "verify", "s3://corpora/tiny", "--taxonomy", str(governed.taxonomy),
                           "--trust", str(governed.trust), *options)
    assert verified.returncode == 0, verified.stderr
    assert "gutenberg/tragedy/hamlet" in verified.stdout and "verified" in verified.stdout
    config = recipe(governed.recipe(
        data={"url": "s3://corpora/tiny", "storage_options": {"endpoint_url": s3_server},
              "cache_dir": str(tmp_path / "cache")},
        train={"max_duration": "4ba"}))
    data = build_data(config, DistInfo())
    local = build_data(recipe(governed.recipe()), DistInfo())
    assert data.provenance["manifest_root"] == local.provenance["manifest_root"]  # same bytes, prepared twice
    batch = next(data.train_batches(0, 0))
    assert torch.equal(batch.inputs, next(local.train_batches(0, 0)).inputs)
    data.train.close(), data.val.close(), local.train.close(), local.val.close()

    # Train from the bucket, through the cache: the same model as training from the local copy.
    with Trainer(config, tmp_path / "from-s3") as trainer:
        trainer.fit()
    assert len(losses(tmp_path / "from-s3")) == 4
    assert list((tmp_path / "cache").glob("*.shard")), "the shards came through the cache"
    Trainer(recipe(governed.recipe(train={"max_duration": "4ba"})), tmp_path / "from-disk").fit()
    assert losses(tmp_path / "from-s3") == losses(tmp_path / "from-disk")
