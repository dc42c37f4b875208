"""Who vouched for the data is evidence, not an input: the same examples, classes and recipe train the same model
whatever keys signed them; a run's evidence still names the keys, and a resume does not mix two sets of them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from smalti.build import build_data
from smalti.distributed import DistInfo
from smalti.errors import CheckpointError
from smalti.trust.entry import decode_entry, encode_entry
from smalti.trainer import Trainer

from conftest import CLASS_TEMPLATE, make_governance, write_policy
from helpers import assert_tree_equal, latest_payload, recipe

DENY_TRAGEDY_EMBEDDING = [{"classes": ["gutenberg/tragedy"], "params": ["tok_emb"], "action": "deny"}]


def _config(g, root: Path, **sections) -> dict:
    policy = write_policy(g, root / "policy.yaml", DENY_TRAGEDY_EMBEDDING)
    ledger = {"enabled": True, "key": str(g.key("trainer")), "entropy_every": 4, "flush_every": 3}
    return g.recipe(governance={"policy": str(policy), "ledger": ledger}, **sections)


def _train(config: dict, run: Path) -> Path:
    with Trainer(recipe(config), run) as trainer:
        trainer.fit()
    return run


def _entries(run: Path) -> list[bytes]:
    with sqlite3.connect(run / "ledger.sqlite") as db:
        return [row[0] for row in db.execute("SELECT data FROM entries ORDER BY idx")]


@pytest.fixture(scope="module")
def two_signings(tmp_path_factory, tiny_corpus):
    """The same corpus, taxonomy and policy, signed twice by two independent sets of keys."""
    first = make_governance(tmp_path_factory.mktemp("keys-1"), tiny_corpus)
    second = make_governance(tmp_path_factory.mktemp("keys-2"), tiny_corpus)
    return first, second


def test_resigning_with_new_keys_trains_the_identical_model_and_ledger(two_signings, tmp_path):
    first, second = two_signings
    # One recipe (the same policy path, re-signed in place; data paths may move freely on resume anyway).
    a = _train(_config(first, tmp_path, train={"max_duration": "10ba"}), tmp_path / "a")
    b = _train(_config(second, tmp_path, train={"max_duration": "10ba"}), tmp_path / "b")
    payload_a, payload_b = latest_payload(a), latest_payload(b)
    assert_tree_equal(payload_a["model"], payload_b["model"], "model")
    assert_tree_equal(payload_a["optimizer"], payload_b["optimizer"], "optimizer")

    entries_a, entries_b = _entries(a), _entries(b)
    assert len(entries_a) == len(entries_b) == 11
    evidence = ("fingerprints", "trainer_key")  # what may differ: who vouched, not what was learned
    for index, (x, y) in enumerate(zip(entries_a, entries_b)):
        body_a, body_b = decode_entry(x).body, decode_entry(y).body
        assert body_a["fingerprints"]["dataset"] == body_b["fingerprints"]["dataset"]  # what shaped the run
        for document in ("taxonomy", "policy"):  # who vouched for it: recorded, and different
            assert body_a["fingerprints"][document] != body_b["fingerprints"][document]
        same_a = {k: v for k, v in body_a.items() if k not in evidence}
        same_b = {k: v for k, v in body_b.items() if k not in evidence}
        assert same_a == same_b, f"entry {index} differs beyond its evidence"
        # bitwise: the bytes of the tables and every other field (the evidence fields put back equal)
        if index:
            assert encode_entry(index, bytes(32), {**body_a, "fingerprints": None}) == \
                encode_entry(index, bytes(32), {**body_b, "fingerprints": None}), f"entry {index} bytes"
    assert decode_entry(entries_a[0]).body["trainer_key"] != decode_entry(entries_b[0]).body["trainer_key"]


def _order(config: dict, batches: int = 6) -> list[list[int]]:
    data = build_data(recipe(config), DistInfo())
    try:
        return [data.sampler.global_batch(0, b).tolist() for b in range(batches)]
    finally:
        data.train.close(), data.val.close()


def _governed_with(root: Path, corpus: Path, change) -> dict:
    """A governed dataset of ``corpus`` plus a one-example document, after ``change`` edits its documents."""
    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.data.sources import documents_from_folder
    from smalti.trust.keys import PublicKey, SigningKey
    from smalti.trust.taxonomy import Taxonomy

    g = make_governance(root, corpus)
    documents = list(documents_from_folder(corpus, template=CLASS_TEMPLATE))
    documents = change(documents)
    taxonomy = Taxonomy.load(g.taxonomy, PublicKey.load(g.trust))
    prepare_dataset(documents, taxonomy, SigningKey.load(g.key("tagger")), str(g.dataset),
                    PrepareOptions(name="tiny", seq_len=16, shard_examples=200, overwrite=True), show_progress=False)
    return g.recipe(data={"cache_dir": str(root / "cache")})


def test_changing_one_example_changes_the_order(tmp_path, tiny_corpus):
    """The control: the order does follow the examples and their classes."""
    import dataclasses

    from smalti.data.sources import Document

    def with_epilogue(class_name: str, text: str):
        def change(documents):  # 20 characters: exactly one training example of 17 tokens
            return documents + [Document("epilogue", class_name, text)]
        return change

    fields = {f.name for f in dataclasses.fields(Document)}
    assert {"doc_id", "class_name", "text"} <= fields
    base = _order(_governed_with(tmp_path / "base", tiny_corpus, with_epilogue("gutenberg/history", "x" * 20)))
    rekeyed = _order(_governed_with(tmp_path / "rekeyed", tiny_corpus, with_epilogue("gutenberg/history", "x" * 20)))
    assert rekeyed == base  # new keys, same everything else
    other_class = _order(_governed_with(tmp_path / "class", tiny_corpus, with_epilogue("gutenberg/comedy/tempest", "x" * 20)))
    other_content = _order(_governed_with(tmp_path / "content", tiny_corpus, with_epilogue("gutenberg/history", "x" * 5 + "y" + "x" * 14)))
    assert other_class != base and other_content != base


def test_a_resume_across_a_key_rotation_is_refused_and_continues_as_a_new_run(two_signings, tmp_path):
    first, second = two_signings
    reference = _train(_config(first, tmp_path, train={"max_duration": "12ba"}), tmp_path / "reference")
    rotating = tmp_path / "rotating"
    config = _config(first, tmp_path, train={"max_duration": "12ba"}, checkpoint={"interval": "4ba", "keep": 5})
    with Trainer(recipe({**config, "train": {**config["train"], "max_duration": "4ba"}}), rotating) as trainer:
        trainer.fit()

    # Data governance rotates every key and re-signs; model risk re-binds and re-signs the same rules in place.
    rotated = _config(second, tmp_path, train={"max_duration": "12ba"}, checkpoint={"interval": "4ba", "keep": 5})
    with pytest.raises(CheckpointError, match=r"ep0-ba4\.pt: trained under taxonomy \w+\.\.\., now \w+\.\.\. \(re-signed"):
        Trainer(recipe(rotated), rotating)

    # The way on: a new run from the checkpoint's weights, under the new keys, ends where the unrotated run ends.
    checkpoint = rotating / "checkpoints" / "ep0-ba4.pt"
    continued = _train({**rotated, "checkpoint": {**rotated["checkpoint"], "load_path": str(checkpoint)}},
                       tmp_path / "continued")
    assert_tree_equal(latest_payload(continued)["model"], latest_payload(reference)["model"], "model")
    genesis = decode_entry(_entries(continued)[0]).body
    assert genesis["trainer_key"] != decode_entry(_entries(rotating)[0]).body["trainer_key"]


def test_a_resume_with_another_trainer_key_is_refused(two_signings, tiny_corpus, tmp_path):
    """One ledger, one signing key: heads signed by two keys would verify under neither. (Where a taxonomy
    names the trainer, its key is checked before; a raw corpus names none.)"""
    from conftest import tiny_recipe
    from smalti.trust.keys import write_key_pair
    from smalti.governance.ledger.store import LedgerError

    first, _ = two_signings
    write_key_pair("impostor", tmp_path / "keys")
    run = tmp_path / "run"
    ledger = {"enabled": True, "key": str(first.key("trainer")), "entropy_every": 0}
    _train(tiny_recipe(tiny_corpus, train={"max_duration": "4ba"}, governance={"ledger": ledger}), run)
    impostor = {**ledger, "key": str(tmp_path / "keys" / "impostor.key")}
    with pytest.raises(LedgerError, match=r"its tree heads are signed by trainer key \w+, this run's key is \w+"):
        Trainer(recipe(tiny_recipe(tiny_corpus, train={"max_duration": "8ba"}, governance={"ledger": impostor})), run)
    assert torch.load(run / "checkpoints" / "ep0-ba4.pt", weights_only=True)["timestamp"]["batch"] == 4
