"""Held-out data that means something for a team's own short documents: three sources of short texts (support
tickets, public docs, customer records) packed into rows by a BPE tokenizer. Whole documents are held out per
class, so no document has rows in both splits, and a trained model's held-out loss per class is far below an
untrained one's (with the old cut of every document's last tenth, every validation row was a string of
fragments and the numbers stayed near ln(vocabulary))."""

from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import numpy as np

from conftest import write_recipe
from helpers import latest_payload

SOURCES = {
    "support/tickets": ("Ticket {n}: the {thing} {fails} after the update. We restarted it and it works again.",
                        ["printer", "laptop", "router", "scanner", "phone"],
                        ["stops", "freezes", "beeps", "reboots", "overheats"]),
    "public/docs": ("To {verb} the {thing}, open the settings page and choose {thing} options, then save.",
                    ["export", "import", "archive", "share", "print"],
                    ["report", "invoice", "calendar", "contact", "folder"]),
    "customer/pii": ("Customer {n} lives at {n} {street} Street and pays by {card} card each month.",
                     ["Oak", "Elm", "Pine", "Maple", "Cedar"], ["visa", "debit", "credit", "store", "gift"]),
}


def short_documents(per_class: int = 60) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for name, (template, first, second) in SOURCES.items():
        for i in range(per_class):
            text = template.format(n=rng.randint(10, 99), thing=rng.choice(first if "{thing}" in template else second),
                                   fails=rng.choice(second), verb=rng.choice(first), street=rng.choice(first),
                                   card=rng.choice(second))
            rows.append({"id": f"{name.split('/')[0]}-{i:03d}", "source": name, "text": text})
    return rows


def _governance(root: Path):
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.trust.taxonomy import Taxonomy, taxonomy_yaml

    keys = root / "keys"
    for name in ("data-governance", "tagger", "trainer"):
        write_key_pair(name, keys)
    pub = lambda n: PublicKey.load(keys / f"{n}.pub").text  # noqa: E731
    taxonomy_path = root / "taxonomy.yaml"
    taxonomy_path.write_text(taxonomy_yaml("acme", list(SOURCES), {
        "data-governance": {"role": "data-governance", "key": pub("data-governance")},
        "tagger": {"role": "tagging", "key": pub("tagger"), "may_tag": ["support", "public", "customer"]},
        "trainer": {"role": "trainer", "key": pub("trainer")}}))
    (root / "taxonomy.yaml.sig").write_text(
        sign_bytes(taxonomy_path.read_bytes(), SigningKey.load(keys / "data-governance.key")).to_json())
    return keys, taxonomy_path, Taxonomy.load(taxonomy_path, PublicKey.load(keys / "data-governance.pub"))


def _stream(out: Path, manifest: dict, split: str, class_name: str) -> np.ndarray:
    """A class's rows of a split laid end to end again (consecutive windows share one token)."""
    from smalti.data.manifest import parse_shard

    windows = []
    for shard in manifest["splits"][split]["shards"]:
        content = parse_shard((out / shard["name"]).read_bytes(), shard["name"])
        windows += [tokens for cls, tokens in zip(content.classes, content.tokens) if cls == class_name]
    return np.concatenate([windows[0]] + [w[1:] for w in windows[1:]]) if windows else np.array([], dtype=np.int64)


def test_whole_documents_are_held_out_by_the_hash_of_their_ids(tmp_path):
    from smalti.data.prepare import choose_holdout
    from smalti.data.sources import Document

    docs = [Document(f"d{i}", "a" if i < 20 else "b", "x" * (10 + i)) for i in range(21)]
    lengths = {d.doc_id: len(d.text) for d in docs}
    holdout = choose_holdout(docs, lengths, "documents", 0.2, min_documents=2)
    held_a = [d for d in docs if d.doc_id in holdout.documents]
    assert len(held_a) >= 2 and sum(lengths[d.doc_id] for d in held_a) >= 0.2 * sum(lengths[d.doc_id] for d in docs[:20])
    assert holdout.tail_classes == {"b"}  # one document: its tail, so the class still trains and validates
    shuffled = choose_holdout(list(reversed(docs)) + [Document("new", "a", "y" * 500)], {**lengths, "new": 500},
                              "documents", 0.2, min_documents=2)
    by_hash = sorted((d for d in docs[:20]), key=lambda d: hashlib.sha256(d.doc_id.encode()).hexdigest())
    assert by_hash[0].doc_id in shuffled.documents  # the same first choices whatever the order or additions
    one = choose_holdout(docs[:2], lengths, "documents", 0.99)
    assert len(one.documents) == 1  # never every document of a class


def test_short_packed_documents_validate_on_whole_documents_and_the_numbers_mean_something(tmp_path):
    import json

    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.data.sources import documents_from_source
    from smalti.data.tokenizer import train_bpe
    from smalti.trust.keys import SigningKey
    from smalti.trainer import Trainer
    from helpers import recipe

    rows = short_documents()
    source = tmp_path / "acme.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys, taxonomy_path, taxonomy = _governance(tmp_path)
    tokenizer = train_bpe((r["text"] for r in rows), 300)
    documents = list(documents_from_source(source, None, None, "text", "source", "id"))
    out = tmp_path / "dataset"
    manifest = prepare_dataset(documents, taxonomy, SigningKey.load(keys / "tagger.key"), str(out),
                               PrepareOptions(name="acme", seq_len=32, shard_examples=500), tokenizer=tokenizer,
                               show_progress=False)
    holdout = manifest["holdout"]
    assert holdout["mode"] == "documents" and holdout["tail_classes"] == []
    eos = tokenizer.eos_id
    for name in SOURCES:
        held = set(holdout["validation_documents"][name])
        assert held and len(held) < 60
        members = [d for d in documents if d.class_name == name]
        val = np.concatenate([np.append(tokenizer.encode(d.text), eos) for d in members if d.doc_id in held])
        train = np.concatenate([np.append(tokenizer.encode(d.text), eos) for d in members if d.doc_id not in held])
        got_val, got_train = _stream(out, manifest, "val", name), _stream(out, manifest, "train", name)
        assert np.array_equal(got_val, val[: len(got_val)]) and len(val) - len(got_val) <= 32
        assert np.array_equal(got_train, train[: len(got_train)]) and len(train) - len(got_train) <= 32

    config = {"seed": 1, "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32, "dropout": 0.1},
              "data": {"url": str(out), "taxonomy": str(taxonomy_path), "trust": str(keys / "data-governance.pub"),
                       "cache_dir": str(tmp_path / "cache"), "seq_len": 32},
              "optimizer": {"name": "adamw", "lr": 3e-3}, "scheduler": {"warmup": "10ba"},
              "train": {"max_duration": "150ba", "global_batch_size": 16, "device": "cpu"},
              "eval": {"interval": "150ba", "max_samples": 512, "batch_size": 32},
              "checkpoint": {"interval": "150ba"}, "logging": {"console": False}}
    write_recipe(tmp_path / "r.yaml", config)
    trainer = Trainer(recipe(config), tmp_path / "run")
    try:
        untrained = trainer.evaluate()
        trainer.fit()
    finally:
        trainer.close()
    losses = latest_payload(tmp_path / "run")["eval_by_class"]
    chance = math.log(300)
    print(f"untrained {untrained['eval/loss']:.3f}, trained per class {losses}, ln(300) = {chance:.3f}")
    assert set(losses) == set(SOURCES) and untrained["eval/loss"] > 0.8 * chance
    for name, loss in losses.items():
        assert loss < 0.5 * chance, (name, loss, chance)  # learned, and measured on documents it never saw
