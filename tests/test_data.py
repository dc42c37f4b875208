import shutil

import numpy as np
import pytest
import torch

from smalti.data.lm import OrderConfig, corpus_data
from smalti.data.sampler import DeterministicSampler, RandomOrder
from smalti.data.sources import documents_from_folder
from smalti.data.tokenizer import CharTokenizer
from smalti.errors import DataError

from conftest import SHAKESPEARE


def load_corpus(folder):
    return list(documents_from_folder(folder, template="{genre}/{work}"))


def test_full_shakespeare_corpus_loads_and_verifies():
    works = load_corpus(SHAKESPEARE)
    assert len(works) == 42
    assert {w.class_name.split("/")[0] for w in works} == {"comedy", "tragedy", "history", "poetry", "romance"}
    assert "tragedy/hamlet" in {w.class_name for w in works}


def test_tampered_text_fails_with_its_name(tmp_path, tiny_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    text = (corpus / "macbeth.txt").read_text()
    (corpus / "macbeth.txt").write_text(text.replace("a", "o", 1))
    with pytest.raises(DataError, match=r"macbeth\.txt: sha256 does not match"):
        load_corpus(corpus)


def test_missing_text_and_manifest(tmp_path, tiny_corpus):
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / "sonnets.txt").unlink()
    with pytest.raises(DataError, match="sonnets.txt.gz not found"):
        load_corpus(corpus)
    with pytest.raises(DataError, match="mapping CSV not found"):
        load_corpus(tmp_path / "nowhere")


def test_tokenizer_round_trip_and_unknown_character():
    tokenizer = CharTokenizer.from_texts(["hello world", "HELLO WORLD!"])
    ids = tokenizer.encode("hello WORLD!")
    assert tokenizer.decode(ids.tolist()) == "hello WORLD!"
    assert CharTokenizer.from_json(tokenizer.to_json()).chars == tokenizer.chars
    with pytest.raises(ValueError, match=r"'z' at position 3"):
        tokenizer.encode("helz", where="prompt")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.encode("h\U0001F600")


def _data(corpus, seq_len=16, **order):
    return corpus_data(corpus, seq_len, OrderConfig(**{"global_batch_size": 8, "seed": 5, **order}))


def test_windows_stay_inside_one_work_and_split_is_per_work(tiny_corpus):
    data = _data(tiny_corpus)
    works = load_corpus(tiny_corpus)
    for index in range(0, len(data.train), 37):
        batch = data.train.gather(torch.tensor([index]))
        text = data.tokenizer.decode(batch.inputs[0].tolist()) + data.tokenizer.decode(batch.targets[0, -1:].tolist())
        owner = works[int(batch.provenance[0, 0])]
        assert text in owner.text[: int(len(owner.text) * 0.9)]
    for index in range(0, len(data.val), 11):
        batch = data.val.gather(torch.tensor([index]))
        owner = works[int(batch.provenance[0, 0])]
        assert data.tokenizer.decode(batch.inputs[0].tolist()) in owner.text[int(len(owner.text) * 0.9):]
    assert set(data.val.classes.tolist()) == {0, 1, 2, 3}
    assert torch.equal(data.train.gather(torch.tensor([3])).targets[0, :-1], data.train.gather(torch.tensor([3])).inputs[0, 1:])


def _sampler(seed=1, fingerprint="ab" * 32):
    return DeterministicSampler(RandomOrder(100), 10, seed=seed, fingerprint=fingerprint, num_samples=100)


def test_order_is_pure_function_of_seed_epoch_fingerprint():
    a, b = _sampler(), _sampler()
    assert torch.equal(a.epoch_order(3), b.epoch_order(3))
    assert not torch.equal(a.epoch_order(3), a.epoch_order(4))
    assert not torch.equal(a.epoch_order(3), _sampler(seed=2).epoch_order(3))
    assert not torch.equal(a.epoch_order(3), _sampler(fingerprint="cd" * 32).epoch_order(3))
    assert sorted(a.epoch_order(0).tolist()) == list(range(100))
    assert a.batches_per_epoch == 10


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_together_see_the_global_batch(tiny_corpus, world_size):
    data = _data(tiny_corpus)
    for epoch in (0, 1):
        single = list(data.train_batches(epoch, 0))
        per_rank = [list(data.train_batches(epoch, 0, rank, world_size)) for rank in range(world_size)]
        for index, batch in enumerate(single):
            union = torch.cat([per_rank[r][index].sample_ids for r in range(world_size)])
            assert torch.equal(union, batch.sample_ids)
            assert torch.equal(torch.cat([per_rank[r][index].inputs for r in range(world_size)]), batch.inputs)


def test_mid_epoch_resume_continues_on_the_same_samples_at_another_world_size(tiny_corpus):
    data = _data(tiny_corpus)
    everything = list(data.train_batches(1, 0))
    state = data.sampler.state_dict(data.sampler.position(epoch=1, batch_in_epoch=7))
    position = data.sampler.check_resumable(state)
    assert (position.epoch, position.samples_seen) == (1, 56)
    resumed = list(data.train_batches(position.epoch, position.samples_seen // 8, rank=0, world_size=1))
    assert [b.sample_ids.tolist() for b in resumed] == [b.sample_ids.tolist() for b in everything[7:]]
    two_ranks = [list(data.train_batches(1, 7, rank, 2)) for rank in range(2)]
    assert torch.equal(torch.cat([two_ranks[0][0].sample_ids, two_ranks[1][0].sample_ids]), everything[7].sample_ids)


def test_resume_refuses_changed_data_or_seed(tiny_corpus):
    data = _data(tiny_corpus)
    state = data.sampler.state_dict(data.sampler.position(0, 2))
    other = _data(tiny_corpus, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.sampler.check_resumable(state)
    longer = _data(tiny_corpus, seq_len=12)
    with pytest.raises(ValueError, match="fingerprint"):
        longer.sampler.check_resumable(state)


def test_eval_subset_is_fixed_and_split_across_ranks(tiny_corpus):
    data = _data(tiny_corpus)
    whole = torch.cat([b.sample_ids for b in data.eval_batches(10, 40)])
    assert whole.numel() == 40 and torch.equal(whole, torch.cat([b.sample_ids for b in data.eval_batches(7, 40)]))
    halves = [torch.cat([b.sample_ids for b in data.eval_batches(10, 40, r, 2)]) for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    assert np.unique(data.val.classes[whole].numpy()).size == 4


def test_too_small_dataset_for_batch(tiny_corpus):
    with pytest.raises(DataError, match="fewer than one global batch"):
        _data(tiny_corpus, global_batch_size=100_000)


def test_split_by_signature_groups_rows_by_their_set_of_classes():
    from smalti.core.batch import Batch

    def batch(provenance):
        rows = len(provenance)
        return Batch(inputs=torch.arange(rows)[:, None], targets=torch.zeros(rows, 1, dtype=torch.long),
                     sample_ids=torch.arange(rows) + 100, provenance=torch.tensor(provenance))

    same = batch([[3, -1], [3, -1], [3, -1]])
    assert same.split_by_signature() == [same]
    # [1, 2] and [2, 1] are one signature; groups come in order of first appearance, rows in their order
    mixed = batch([[2, -1], [1, 2], [2, -1], [2, 1], [5, -1]])
    parts = mixed.split_by_signature()
    assert [p.sample_ids.tolist() for p in parts] == [[100, 102], [101, 103], [104]]
    assert [p.inputs.flatten().tolist() for p in parts] == [[0, 2], [1, 3], [4]]


THREAD_PROBE = """
import os, sys
from pathlib import Path
from smalti.data.manifest import parse_shard, verify_shard, ShardEntry
import json, pyarrow  # imported before counting: importing starts jemalloc's own thread

def threads():
    return len(os.listdir("/proc/self/task"))

dataset = Path(sys.argv[1])
manifest = json.loads((dataset / "manifest.json").read_text())
entry = ShardEntry.from_json("train", manifest["splits"]["train"]["shards"][0])
path = dataset / entry.name
before = threads()
content = parse_shard(path, "file", columns=["tokens"])  # a cached, verified shard: memory-mapped
content.ids  # the other columns, read on demand
verify_shard(path.read_bytes(), entry, str(dataset)).classes  # a downloaded shard: bytes
print(before, threads(), content.tokens.shape[0])
"""


def test_reading_shards_starts_no_arrow_thread(governed):
    """Arrow's thread pools can abort a process at exit (apache/arrow#34314, seen after `smalti audit` in
    CI): reading a shard, from a file or from bytes, must start none."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", THREAD_PROBE, str(governed.dataset)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    before, after, rows = map(int, done.stdout.split())
    assert rows > 0 and after == before, f"{after - before} thread(s) started while reading shards"
