"""Real tokenizers and the data sources teams bring: a byte-level BPE, packing, and every source format."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from smalti.data.prepare import PrepareOptions, prepare_dataset
from smalti.data.sources import documents_from_source
from smalti.data.tokenizer import HFTokenizer, train_bpe
from smalti.trust.keys import PublicKey, SigningKey
from smalti.trust.taxonomy import Taxonomy

from conftest import TINY_WORKS, smalti_cli


@pytest.fixture(scope="module")
def bpe(tiny_corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("bpe")
    done = smalti_cli("tokenizer", "train", "--source", str(tiny_corpus), "--class-template", "gutenberg/{genre}/{work}",
                      "--vocab-size", "400", "--out", str(directory))
    assert done.returncode == 0, done.stderr
    assert "400 tokens" in done.stdout and "<|endoftext|>" in done.stdout
    return directory


def test_a_trained_tokenizer_round_trips_and_loads_in_transformers(bpe, tiny_corpus):
    from transformers import AutoTokenizer

    tokenizer = HFTokenizer.from_directory(bpe)
    text = (tiny_corpus / "hamlet.txt").read_text()[:3000]
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and len(ids) < len(text) / 1.5  # merges learned: fewer tokens than bytes
    assert tokenizer.vocab_size == 400 and tokenizer.decode([tokenizer.eos_id]) == "<|endoftext|>"
    again = train_bpe([(tiny_corpus / f"{w}.txt").read_text() for w in TINY_WORKS], 400)
    assert again.fingerprint == tokenizer.fingerprint  # training is deterministic
    loaded = AutoTokenizer.from_pretrained(str(bpe))
    assert loaded(text)["input_ids"] == ids.tolist() and loaded.eos_token == "<|endoftext|>"
    refused = smalti_cli("tokenizer", "train", "--source", str(tiny_corpus), "--class-template", "x/{work}",
                         "--vocab-size", "100", "--out", str(bpe.parent / "small"))
    assert refused.returncode != 0 and "--vocab-size 100: a byte-level BPE needs at least 260" in refused.stderr


def _taxonomy(governed) -> Taxonomy:
    return Taxonomy.load(governed.taxonomy, PublicKey.load(governed.trust))


def _prepare(governed, documents, out: Path, tokenizer=None, holdout: str = "auto") -> dict:
    return prepare_dataset(documents, _taxonomy(governed), SigningKey.load(governed.key("tagger")), str(out),
                           PrepareOptions(name="same", seq_len=16, shard_examples=150, holdout=holdout), tokenizer=tokenizer,
                           show_progress=False)


def _rows(tiny_corpus: Path) -> list[dict]:
    """The corpus as table rows, in the order a folder walk finds the files (genre folder, then name)."""
    rows = [{"id": f"{genre}/{work}", "class": f"gutenberg/{genre}/{work}", "text": (tiny_corpus / f"{work}.txt").read_text()}
            for work, genre in TINY_WORKS.items()]
    return sorted(rows, key=lambda r: r["id"])


def test_every_source_prepares_to_the_same_manifest_as_jsonl(governed, tiny_corpus, bpe, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(tiny_corpus)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with (tmp_path / "docs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "class", "text"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docs.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tree = tmp_path / "tree"
    for row in rows:
        path = tree / f"{row['id']}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(row["text"])

    tokenizer = HFTokenizer.from_directory(bpe)
    sources = {"jsonl": (jsonl, None), "csv": (tmp_path / "docs.csv", None), "parquet": (tmp_path / "docs.parquet", None),
               "datasets": (tmp_path / "saved", None), "tree": (tree, "gutenberg/{dir}/{stem}")}
    manifests = {}
    for name, (source, template) in sources.items():
        documents = list(documents_from_source(source, template=template, id_column=None if template else "id"))
        assert [d.doc_id for d in documents] == [r["id"] for r in rows], name
        manifests[name] = _prepare(governed, documents, tmp_path / f"out-{name}", tokenizer)
        chars = _prepare(governed, documents, tmp_path / f"chars-{name}")  # and with the character tokenizer
        manifests[f"{name}-chars"] = chars
    for name in sources:
        assert manifests[name] == manifests["jsonl"], name
        assert manifests[f"{name}-chars"] == manifests["jsonl-chars"], name
    assert manifests["jsonl"]["tokenizer"]["sha256"] == tokenizer.fingerprint
    assert (tmp_path / "out-jsonl" / "tokenizer.json").read_text() == tokenizer.spec


def test_packing_joins_a_class_s_documents_with_eos_and_never_mixes_classes(governed, tiny_corpus, bpe, tmp_path):
    from smalti.data.manifest import parse_shard

    tokenizer = HFTokenizer.from_directory(bpe)
    rows = _rows(tiny_corpus)
    # Two short documents of Hamlet's class: packed, they fill rows a window per document would waste.
    documents = list(documents_from_source(_jsonl(tmp_path, rows + [
        {"id": "extra/1", "class": "gutenberg/tragedy/hamlet", "text": "To be."},
        {"id": "extra/2", "class": "gutenberg/tragedy/hamlet", "text": "Or not to be."}]), id_column="id"))
    manifest = _prepare(governed, documents, tmp_path / "packed", tokenizer, holdout="tail")
    examples = []
    for shard in manifest["splits"]["train"]["shards"]:
        content = parse_shard((tmp_path / "packed" / shard["name"]).read_bytes(), shard["name"])
        examples += list(zip(content.ids, content.classes, content.tokens))
    by_class: dict[str, list[np.ndarray]] = {}
    for example_id, class_name, tokens in examples:
        assert example_id.startswith(class_name + "/train/")  # one class per row, by construction and by name
        by_class.setdefault(class_name, []).append(tokens)
    eos = tokenizer.eos_id
    for class_name, windows in by_class.items():
        stream = np.concatenate([windows[0]] + [w[1:] for w in windows[1:]])  # windows overlap by one token
        docs = [d for d in documents if d.class_name == class_name]
        expected = np.concatenate([np.append(tokenizer.encode(d.text)[: int(len(tokenizer.encode(d.text)) * 0.9)], eos)
                                   for d in docs])
        assert np.array_equal(stream, expected[: len(stream)]), class_name
        assert len(expected) - len(stream) < 17  # only the last partial row is left out
    hamlet = np.concatenate(by_class["gutenberg/tragedy/hamlet"])
    assert (hamlet == eos).sum() >= 2


def _jsonl(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_dataset_s_tokenizer_is_checked_against_the_signed_manifest(governed_copy, tiny_corpus, bpe, tmp_path):
    from smalti.build import build_data
    from smalti.distributed import DistInfo
    from smalti.errors import DataError

    from helpers import recipe

    tokenizer = HFTokenizer.from_directory(bpe)
    documents = list(documents_from_source(_jsonl(tmp_path, _rows(tiny_corpus)), id_column="id"))
    out = governed_copy.root / "bpe-dataset"
    _prepare(governed_copy, documents, out, tokenizer)
    config = recipe(governed_copy.recipe(data={"url": str(out)}))
    data = build_data(config, DistInfo())
    assert data.tokenizer.fingerprint == tokenizer.fingerprint and data.tokenizer.eos_id == tokenizer.eos_id
    data.train.close(), data.val.close()
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["added_tokens"][0]["content"] = "<|swapped|>"
    (out / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"bpe-dataset/tokenizer.json: its sha256 differs from the signed manifest"):
        build_data(config, DistInfo())


def test_bad_sources_are_one_line(governed, tmp_path, bpe):
    rows = tmp_path / "no-class.jsonl"
    rows.write_text(json.dumps({"text": "words", "class": "gutenberg/comedy/tempest"}) + "\n\n"
                    + json.dumps({"text": "words"}) + "\n")  # the third line of the file, after a blank one
    common = ["--taxonomy", str(governed.taxonomy), "--trust", str(governed.trust), "--key", str(governed.key("tagger"))]
    done = smalti_cli("data", "prepare", "--source", str(rows), "--out", str(tmp_path / "x"), *common)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "no-class.jsonl:3: no 'class' column" in done.stderr and not (tmp_path / "x").exists()
    table = tmp_path / "sources.csv"  # a column's values mapped into the taxonomy with a template
    table.write_text('text,source\n"first\nsecond line",tempest\nthird,hamlett\n')
    done = smalti_cli("data", "prepare", "--source", str(table), "--class-template", "gutenberg/comedy/{source}",
                      "--out", str(tmp_path / "t"), *common)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1
    assert "class 'gutenberg/comedy/hamlett' is not in taxonomy" in done.stderr
    assert "did you mean 'gutenberg/tragedy/hamlet'" in done.stderr
    done = smalti_cli("data", "prepare", "--source", str(table), "--class-template", "gutenberg/{genre}/{source}",
                      "--out", str(tmp_path / "t"), *common)
    assert done.returncode != 0 and "sources.csv:3: no 'genre' column (for --class-template" in done.stderr
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "a.txt").write_text("text")
    done = smalti_cli("data", "prepare", "--source", str(tmp_path / "plain"), "--out", str(tmp_path / "y"), *common)
    assert done.returncode != 0 and "needs --class-template, e.g. 'gutenberg/{dir}/{stem}'" in done.stderr
    done = smalti_cli("data", "prepare", "--source", str(tmp_path / "plain"), "--class-template", "x/{genre}",
                      "--out", str(tmp_path / "y"), *common)
    assert done.returncode != 0 and "offers {dir} and {stem}, not {genre}" in done.stderr
    done = smalti_cli("data", "prepare", "--source", str(rows), "--tokenizer", str(tmp_path / "nowhere"),
                      "--out", str(tmp_path / "z"), *common)
    assert done.returncode != 0 and "nowhere: no tokenizer.json" in done.stderr
