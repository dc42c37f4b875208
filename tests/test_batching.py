"""Elastic determinism and the batching modes, on a real prepared dataset."""

import numpy as np
import pytest
import torch

from smalti.build import build_data
from smalti.core.callback import Callback
from smalti.data.sampler import MixtureOrder
from smalti.distributed import DistInfo
from smalti.errors import DataError
from smalti.trainer import Trainer

from conftest import make_governance
from helpers import losses, recipe


def _data(g, **data):
    return build_data(recipe(g.recipe(data=data, train={"microbatch_size": 4})), DistInfo())


@pytest.mark.parametrize("batching", ["random", "stratified", "per_class"])
def test_union_of_ranks_is_the_global_batch_for_any_world_size_and_workers(governed, batching):
    reference = _data(governed, batching=batching)
    expected = [b.sample_ids for b in reference.train_batches(epoch=1, start_batch=0)][:12]
    for world_size in (1, 2, 4):
        for workers in (0, 2):
            data = _data(governed, batching=batching, workers=workers)
            ranks = [list(data.train_batches(1, 0, rank, world_size))[:12] for rank in range(world_size)]
            for index, batch_ids in enumerate(expected):
                union = torch.cat([ranks[r][index].sample_ids for r in range(world_size)])
                assert torch.equal(union, batch_ids), (batching, world_size, workers, index)
            inputs = torch.cat([ranks[r][3].inputs for r in range(world_size)])
            assert torch.equal(inputs, reference.train.gather(expected[3]).inputs)


def test_order_depends_on_seed_epoch_and_dataset(governed, tmp_path, tiny_corpus):
    a, b = _data(governed), _data(governed)
    assert torch.equal(a.sampler.epoch_order(2), b.sampler.epoch_order(2))
    assert not torch.equal(a.sampler.epoch_order(2), a.sampler.epoch_order(3))
    # Same examples under other keys and another shard layout: the same order (who signed is not an input).
    other = make_governance(tmp_path / "other", tiny_corpus, shard_examples=150)
    c = build_data(recipe(other.recipe()), DistInfo())
    assert c.fingerprint == a.fingerprint and torch.equal(c.sampler.epoch_order(2), a.sampler.epoch_order(2))
    reseeded = build_data(recipe(other.recipe(seed=4)), DistInfo())
    assert not torch.equal(reseeded.sampler.epoch_order(2), a.sampler.epoch_order(2))


def test_stratified_batches_hold_each_class_share_within_one_example(governed):
    data = _data(governed, batching="stratified")
    classes = data.train.classes
    share = torch.bincount(classes).double() / len(classes)
    batch_size = data.sampler.global_batch_size
    running = torch.zeros_like(share)
    for k in range(data.sampler.batches_per_epoch):
        counts = torch.bincount(classes[data.sampler.global_batch(0, k)], minlength=len(share)).double()
        assert ((counts - share * batch_size).abs() <= 1.0 + 1e-9).all(), k
        running += counts
        assert ((running - share * batch_size * (k + 1)).abs() <= 1.0 + 1e-9).all(), k


def test_per_class_microbatches_each_hold_one_class(governed, tmp_path):
    seen = []

    class Watch(Callback):
        def before_forward(self, state, logger):
            seen.append(state.batch.provenance[:, 0].unique().tolist())

    config = recipe(governed.recipe(data={"batching": "per_class"},
                                    train={"max_duration": "6ba", "microbatch_size": 2, "global_batch_size": 8}))
    Trainer(config, tmp_path / "run", callbacks=[Watch()]).fit()
    assert len(seen) == 6 * 4 and all(len(classes) == 1 for classes in seen)
    assert len({c[0] for c in seen}) > 1


def test_per_class_unit_must_be_a_multiple_of_the_microbatch(governed):
    from smalti.errors import RecipeError

    with pytest.raises(RecipeError, match="class_unit"):
        build_data(recipe(governed.recipe(data={"batching": "per_class", "class_unit": 3},
                                          train={"microbatch_size": 2})), DistInfo())


def test_shuffle_blocks_keep_each_batch_within_a_block_of_shards(governed):
    data = _data(governed, shuffle_block_shards=1)
    starts = np.cumsum([0] + data.train.shard_sizes())
    for k in range(0, data.sampler.batches_per_epoch, 5):
        shards = set(np.searchsorted(starts, data.sampler.global_batch(0, k).numpy(), side="right") - 1)
        assert len(shards) <= 2  # one shard, or the boundary between two consecutive ones


def test_mixture_order_holds_the_weights_and_streams_small_datasets():
    order = MixtureOrder(sizes=(30, 300), weights=(0.5, 0.5))
    epoch = order.epoch_order(0, seed=1, fingerprint="f", global_batch_size=10).reshape(-1, 10)
    small = (epoch < 30).sum(axis=1)
    assert ((small >= 4) & (small <= 6)).all()  # 5 of 10 from each, within one
    first_30 = np.sort(epoch[epoch < 30].reshape(-1)[:30])
    assert np.array_equal(first_30, np.arange(30))  # the small dataset repeats whole permutations
    again = order.epoch_order(0, seed=1, fingerprint="f", global_batch_size=10)
    assert np.array_equal(again, epoch.reshape(-1))


def test_mixture_of_two_prepared_datasets_trains(governed, tmp_path):
    config = recipe(governed.recipe(
        data={"url": None, "mixture": [{"url": str(governed.dataset), "weight": 3.0},
                                      {"url": str(governed.dataset), "weight": 1.0}]},
        train={"max_duration": "4ba"}))
    data = build_data(config, DistInfo())
    half = len(data.train) // 2
    first = (data.sampler.epoch_order(0)[:80] < half).double().mean().item()
    assert abs(first - 0.75) < 0.05
    Trainer(config, tmp_path / "run", data=data).fit()
    assert len(losses(tmp_path / "run")) == 4
    with pytest.raises(DataError, match="random"):
        build_data(recipe(governed.recipe(data={"url": None, "batching": "stratified",
                                                "mixture": [{"url": str(governed.dataset), "weight": 1.0}]})),
                   DistInfo())


def test_shorter_seq_len_than_prepared_is_truncated_and_longer_refused(governed):
    data = build_data(recipe(governed.recipe(model={"block_size": 16}, data={"seq_len": 8})), DistInfo())
    assert next(data.train_batches(0, 0)).inputs.shape[1] == 8
    with pytest.raises(DataError, match="fewer than seq_len 24"):
        build_data(recipe(governed.recipe(model={"block_size": 32}, data={"seq_len": 24})), DistInfo())


@pytest.mark.parametrize("batching", ["random", "stratified", "per_class"])
def test_crash_and_resume_on_a_signed_dataset_is_bitwise_exact(governed, tmp_path, batching):
    from helpers import CrashAt, assert_tree_equal, latest_payload

    config = recipe(governed.recipe(data={"batching": batching},
                                    train={"max_duration": "20ba", "microbatch_size": 4},
                                    checkpoint={"interval": "5ba"}, model={"dropout": 0.1}))
    Trainer(config, tmp_path / "reference").fit()
    with pytest.raises(CrashAt.Crash):
        Trainer(config, tmp_path / "resumed", callbacks=[CrashAt(12)]).fit()
    Trainer(config, tmp_path / "resumed").fit()
    a, b = latest_payload(tmp_path / "reference"), latest_payload(tmp_path / "resumed")
    for key in ("model", "optimizer", "rng", "sampler", "data"):
        assert_tree_equal(a[key], b[key], key)
    assert losses(tmp_path / "reference") == losses(tmp_path / "resumed")


@pytest.mark.parametrize("order", ["one shard", "runs of shards", "interleaved"])
def test_gathered_rows_are_the_examples_asked_for_in_any_order(governed, order):
    """The loader gathers a group of batches by runs of the same shard (or shard by shard when the order
    interleaves them); each row must be its example's tokens, checked against pyarrow reading the shards."""
    import pyarrow.parquet as pq

    data = build_data(recipe(governed.recipe()), DistInfo())
    split = data.train
    try:
        shards = [pq.read_table(governed.dataset / entry.name, columns=["tokens"]).column("tokens").to_pylist()
                  for entry in split.shards]
        everything = np.array([row for shard in shards for row in shard], dtype=np.int64)
        first = len(shards[0])
        generator = torch.Generator().manual_seed(0)
        indices = {"one shard": torch.randperm(first, generator=generator)[:50],
                   "runs of shards": torch.cat([torch.arange(len(split) - 30, len(split)), torch.arange(5, 40),
                                                torch.arange(first, first + 20)]),
                   "interleaved": torch.randperm(len(split), generator=generator)}[order]
        batch = split.gather(indices)
        window = everything[indices.numpy()][:, : batch.inputs.shape[1] + 1]
        assert torch.equal(batch.inputs, torch.from_numpy(window[:, :-1]))
        assert torch.equal(batch.targets, torch.from_numpy(window[:, 1:]))
        assert torch.equal(batch.provenance.squeeze(1), split.classes[indices])
    finally:
        split.close(), data.val.close()
