"""Guarantee G2, fail closed: every tampering of a real prepared dataset stops loading before any gradient."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smalti.build import build_data
from smalti.data.manifest import canonical_json
from smalti.distributed import DistInfo
from smalti.errors import SmaltiError
from smalti.trust.keys import SigningKey, sign_bytes
from smalti.trainer import Trainer

from conftest import smalti_cli, write_recipe
from helpers import recipe


def _manifest(g):
    return json.loads((g.dataset / "manifest.json").read_text())


def _resign(g, manifest, key_name="tagger"):
    raw = canonical_json(manifest)
    (g.dataset / "manifest.json").write_bytes(raw)
    (g.dataset / "manifest.json.sig").write_text(sign_bytes(raw, SigningKey.load(g.key(key_name))).to_json())


def _rewrite_shard(path, change):
    table = pq.read_table(path)
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    change(columns)
    tokens = pa.FixedSizeListArray.from_arrays(
        pa.array([t for row in columns["tokens"] for t in row], pa.uint16()), len(columns["tokens"][0])
    )
    rebuilt = pa.table({
        "id": pa.array(columns["id"], pa.string()),
        "class": pa.array(columns["class"], pa.string()).dictionary_encode(),
        "tokens": tokens,
        "content_sha256": pa.array(columns["content_sha256"], pa.binary(32)),
    })
    pq.write_table(rebuilt, path, compression="zstd")


def _refuses(g, pattern, lazy=False):
    """Loading fails with one line matching ``pattern``, and training never starts."""
    config = recipe(g.recipe(data={"verify": "lazy" if lazy else "eager"}))
    with pytest.raises(SmaltiError, match=pattern) as info:
        build_data(config, DistInfo())
    assert "\n" not in str(info.value)
    run_dir = g.root / "run"
    with pytest.raises(SmaltiError, match=pattern):
        Trainer(config, run_dir).fit()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    return str(info.value)


def test_untampered_dataset_loads(governed):
    data = build_data(recipe(governed.recipe()), DistInfo())
    assert len(data.train) == sum(_manifest(governed)["splits"]["train"]["class_counts"].values())
    assert data.provenance["manifest_root"] == _manifest(governed)["merkle_root"]


def test_flipped_shard_byte(governed_copy):
    shard = governed_copy.dataset / "train-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    _refuses(governed_copy, r"train-00002\.parquet: ")


def test_example_content_changed(governed_copy):
    def change(columns):
        columns["tokens"][5] = [(t + 1) % 20 for t in columns["tokens"][5]]

    _rewrite_shard(governed_copy.dataset / "train-00001.parquet", change)
    message = _refuses(governed_copy, r"train-00001\.parquet: example '.*/train/\d+': content does not match")
    assert "content_sha256" in message


def test_example_content_and_hash_changed_together(governed_copy):
    from smalti.data.manifest import content_sha256
    import numpy as np

    def change(columns):
        columns["tokens"][3] = [(t + 1) % 20 for t in columns["tokens"][3]]
        columns["content_sha256"][3] = content_sha256(np.array(columns["tokens"][3]))

    _rewrite_shard(governed_copy.dataset / "train-00000.parquet", change)
    _refuses(governed_copy, r"train-00000\.parquet: the examples' ids, order or content hashes differ from what was signed \(Merkle root mismatch")


def test_example_class_changed(governed_copy):
    def change(columns):
        columns["class"][7] = "gutenberg/comedy/tempest" if "tempest" not in columns["class"][7] else "gutenberg/poetry/sonnets"

    _rewrite_shard(governed_copy.dataset / "train-00003.parquet", change)
    _refuses(governed_copy, r"train-00003\.parquet: example '.*': class '.*' differs from the signed class")


def test_a_shard_verified_once_in_a_process_is_not_rehashed_row_by_row_but_changed_bytes_still_fail(
        governed_copy, monkeypatch):
    """Deletion builds the same data twice in one process; the second build trusts only identical bytes."""
    from smalti.data import manifest as manifest_module

    monkeypatch.setattr(manifest_module, "_VERIFIED_ENTRIES", set())
    config = recipe(governed_copy.recipe(data={"verify": "eager"}))
    first = build_data(config, DistInfo())
    assert len(manifest_module._VERIFIED_ENTRIES) == sum(
        len(split["shards"]) for split in _manifest(governed_copy)["splits"].values())

    def no_row_checks(runs):
        raise AssertionError("rows were checked again")

    with monkeypatch.context() as patch:
        patch.setattr(manifest_module, "expand_runs", no_row_checks)
        second = build_data(config, DistInfo())
    assert len(second.train) == len(first.train)

    def change(columns):
        columns["tokens"][5] = [(t + 1) % 20 for t in columns["tokens"][5]]

    _rewrite_shard(governed_copy.dataset / "train-00001.parquet", change)
    _refuses(governed_copy, r"train-00001\.parquet: example '.*/train/\d+': content does not match")


def test_manifest_altered_after_signing(governed_copy):
    manifest = _manifest(governed_copy)
    manifest["splits"]["train"]["examples"] += 1
    (governed_copy.dataset / "manifest.json").write_bytes(canonical_json(manifest))
    _refuses(governed_copy, r"manifest\.json: signature does not match the content")


def test_manifest_not_signed(governed_copy):
    (governed_copy.dataset / "manifest.json.sig").unlink()
    _refuses(governed_copy, r"manifest\.json: not signed")


def test_manifest_signed_by_a_non_tagging_authority(governed_copy):
    _resign(governed_copy, _manifest(governed_copy), key_name="model-risk")
    _refuses(governed_copy, r"manifest\.json: signed by key \w+, which is no tagging authority")


def test_signer_not_authorised_for_a_class(governed_copy):
    _resign(governed_copy, _manifest(governed_copy), key_name="comedy-tagger")  # may tag gutenberg/comedy only
    _refuses(governed_copy, r"signer 'comedy-tagger' is not authorised to tag class 'gutenberg/(poetry|tragedy)/")


def test_class_missing_from_taxonomy(governed_copy):
    manifest = _manifest(governed_copy)
    shard = manifest["splits"]["train"]["shards"][0]
    old = shard["classes"][0][0]
    shard["classes"][0][0] = "gutenberg/tragedy/cardenio"
    counts = manifest["splits"]["train"]["class_counts"]
    counts["gutenberg/tragedy/cardenio"] = counts.pop(old)
    _resign(governed_copy, manifest)
    _refuses(governed_copy, r"train-00000\.parquet: class 'gutenberg/tragedy/cardenio' is not in taxonomy 'tiny'")


def test_taxonomy_unsigned(governed_copy):
    (governed_copy.root / "taxonomy.yaml.sig").unlink()
    _refuses(governed_copy, r"taxonomy\.yaml: not signed")


def test_taxonomy_altered(governed_copy):
    path = governed_copy.taxonomy
    path.write_text(path.read_text().replace("deletable", "deletable") + "\n# edited\n")
    _refuses(governed_copy, r"taxonomy\.yaml: signature does not match the content")


def test_taxonomy_signed_by_someone_else(governed_copy):
    path = governed_copy.taxonomy
    signature = sign_bytes(path.read_bytes(), SigningKey.load(governed_copy.key("tagger")))
    (governed_copy.root / "taxonomy.yaml.sig").write_text(signature.to_json())
    _refuses(governed_copy, r"taxonomy\.yaml: signed by key \w+, not by the trusted data-governance key")


def test_dataset_prepared_under_another_taxonomy(governed_copy, governed):
    text = governed_copy.taxonomy.read_text().replace("taxonomy: tiny", "taxonomy: tiny-v2")
    governed_copy.taxonomy.write_text(text)
    signature = sign_bytes(governed_copy.taxonomy.read_bytes(), SigningKey.load(governed_copy.key("data-governance")))
    (governed_copy.root / "taxonomy.yaml.sig").write_text(signature.to_json())
    _refuses(governed_copy, r"manifest\.json: prepared under taxonomy \w+\.\.\., not the given taxonomy")


def test_missing_shard(governed_copy):
    (governed_copy.dataset / "val-00000.parquet").unlink()
    _refuses(governed_copy, r"val-00000\.parquet: shard listed in the manifest is missing")


def test_lazy_verification_stops_at_the_bad_shard(governed_copy):
    def change(columns):
        columns["tokens"][0] = [(t + 1) % 20 for t in columns["tokens"][0]]

    _rewrite_shard(governed_copy.dataset / "train-00004.parquet", change)
    config = recipe(governed_copy.recipe(data={"verify": "lazy"}, train={"max_duration": "1ep"}))
    trainer = Trainer(config, governed_copy.root / "lazy")  # lazy: nothing read yet beyond what eval needs
    with pytest.raises(SmaltiError, match=r"train-00004\.parquet: example '.*': content does not match"):
        trainer.fit()


def test_cli_fails_closed_with_one_line_and_nonzero_exit(governed_copy, tmp_path):
    def change(columns):
        columns["class"][0] = "gutenberg/comedy/tempest" if "tempest" not in columns["class"][0] else "gutenberg/poetry/sonnets"

    _rewrite_shard(governed_copy.dataset / "train-00000.parquet", change)
    path = write_recipe(tmp_path / "r.yaml", governed_copy.recipe())
    result = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-00000.parquet: example '" in lines[0], result.stderr
    verify = smalti_cli("data", "verify", str(governed_copy.dataset), "--taxonomy", str(governed_copy.taxonomy),
                         "--trust", str(governed_copy.trust))
    assert verify.returncode != 0 and "differs from the signed class" in verify.stderr


# ---------------------------------------------------------------- rows, shards and releases the manifest did not sign


def test_a_row_deleted_inside_a_shard(governed_copy):
    _rewrite_shard(governed_copy.dataset / "train-00000.parquet",
                   lambda columns: [values.pop(7) for values in columns.values()])
    _refuses(governed_copy, r"train-00000\.parquet: 199 examples, the signed manifest says 200")


def test_a_row_duplicated_over_another_inside_a_shard(governed_copy):
    def change(columns):  # row 3 copied over row 5: its own hash and class, so every per-row check passes
        for values in columns.values():
            values[5] = values[3]

    _rewrite_shard(governed_copy.dataset / "train-00000.parquet", change)
    _refuses(governed_copy, r"train-00000\.parquet: example '[^']+/train/000003' appears twice \(rows 3 and 5\)")


def test_rows_reordered_inside_a_shard(governed_copy):
    def change(columns):  # two rows of one class swapped whole: ids, hashes and classes all still agree
        for values in columns.values():
            values[10], values[11] = values[11], values[10]

    _rewrite_shard(governed_copy.dataset / "train-00000.parquet", change)
    _refuses(governed_copy, r"train-00000\.parquet: the examples' ids, order or content hashes differ .*moved")


def test_an_extra_shard_the_manifest_does_not_list(governed_copy):
    import shutil

    shutil.copy(governed_copy.dataset / "train-00001.parquet", governed_copy.dataset / "train-00099.parquet")
    _refuses(governed_copy, r"dataset/train-00099\.parquet: a shard the signed manifest does not list")
    verify = smalti_cli("data", "verify", str(governed_copy.dataset), "--taxonomy", str(governed_copy.taxonomy),
                        "--trust", str(governed_copy.trust))
    assert verify.returncode != 0 and "train-00099.parquet: a shard the signed manifest does not list" in verify.stderr


def _prepare(g, documents, **options):
    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.trust.keys import PublicKey
    from smalti.trust.taxonomy import Taxonomy

    taxonomy = Taxonomy.load(g.taxonomy, PublicKey.load(g.trust))
    return prepare_dataset(documents, taxonomy, SigningKey.load(g.key("tagger")), str(g.dataset),
                           PrepareOptions(name="tiny", seq_len=16, shard_examples=200, **options), show_progress=False)


def test_a_rollback_to_an_older_signed_release_is_refused(governed_copy, tiny_corpus, tmp_path):
    """Release 2 drops a work; putting release 1 back (validly signed) must not train the dropped work again."""
    import shutil

    from conftest import CLASS_TEMPLATE
    from smalti.data.sources import documents_from_folder

    g = governed_copy
    first = _manifest(g)
    assert first["version"] == 1
    build_data(recipe(g.recipe()), DistInfo())  # this machine (its cache folder) has now seen release 1
    release_1 = tmp_path / "release-1"
    shutil.copytree(g.dataset, release_1)

    documents = [d for d in documents_from_folder(tiny_corpus, template=CLASS_TEMPLATE) if "macbeth" not in d.doc_id]
    with pytest.raises(SmaltiError, match="already holds a prepared dataset"):
        _prepare(g, documents)
    second = _prepare(g, documents, overwrite=True)
    assert second["version"] == 2 and second["merkle_root"] != first["merkle_root"]
    on_disk = sorted(p.name for p in g.dataset.glob("*.parquet"))  # release 1's extra shards went with it
    assert on_disk == sorted(s["name"] for split in second["splits"].values() for s in split["shards"])
    assert len(on_disk) < len(list(release_1.glob("*.parquet")))
    data = build_data(recipe(g.recipe()), DistInfo())  # release 2 loads, and raises the record to 2
    assert data.provenance["manifest_version"] == 2

    shutil.rmtree(g.dataset)
    shutil.copytree(release_1, g.dataset)  # the rollback: every byte and signature of release 1 is genuine
    message = _refuses(g, r"dataset 'tiny' version 1 is older than version 2 already loaded from here")
    assert first["merkle_root"] in message  # and says how to train on it on purpose

    pinned = recipe(g.recipe(data={"manifest_root": first["merkle_root"]}))
    assert build_data(pinned, DistInfo()).provenance["manifest_root"] == first["merkle_root"]
    # A machine that never saw release 2 is protected by the recipe's floor, or by a pin to release 2.
    fresh = {"cache_dir": str(tmp_path / "fresh-cache")}
    for rule, pattern in (({"min_version": 2}, r"version 1 is older than data.min_version 2"),
                          ({"manifest_root": second["merkle_root"]}, r"is not the root data.manifest_root pins")):
        with pytest.raises(SmaltiError, match=pattern):
            build_data(recipe(g.recipe(data={**fresh, **rule})), DistInfo())
    assert build_data(recipe(g.recipe(data=fresh)), DistInfo()).provenance["manifest_version"] == 1


def test_prepare_refuses_a_version_that_does_not_move_forward(governed_copy, tiny_corpus):
    from conftest import CLASS_TEMPLATE
    from smalti.data.sources import documents_from_folder

    documents = list(documents_from_folder(tiny_corpus, template=CLASS_TEMPLATE))
    with pytest.raises(SmaltiError, match=r"version 1 must be at least 1 and above the version it replaces \(1\)"):
        _prepare(governed_copy, documents, overwrite=True, version=1)
    assert _prepare(governed_copy, documents, overwrite=True, version=7)["version"] == 7


def test_a_resumed_run_refuses_another_release_in_one_line(governed_copy, tiny_corpus, tmp_path):
    """The run's own record: even on a machine whose cache never saw the newer release, a resume refuses to go back."""
    import shutil

    from conftest import CLASS_TEMPLATE
    from smalti.data.sources import documents_from_folder
    from smalti.errors import CheckpointError

    g = governed_copy
    release_1 = tmp_path / "release-1"
    shutil.copytree(g.dataset, release_1)
    documents = [d for d in documents_from_folder(tiny_corpus, template=CLASS_TEMPLATE) if "macbeth" not in d.doc_id]
    _prepare(g, documents, overwrite=True)
    run = tmp_path / "run"
    Trainer(recipe(g.recipe(train={"max_duration": "4ba"})), run).fit()
    shutil.rmtree(g.dataset)
    shutil.copytree(release_1, g.dataset)
    elsewhere = g.recipe(train={"max_duration": "8ba"}, data={"cache_dir": str(tmp_path / "other-cache")})
    with pytest.raises(CheckpointError, match=r"ep0-ba4\.pt: trained on release 2 of the dataset; .* now holds release 1"):
        Trainer(recipe(elsewhere), run)
    # Any other change of the examples is refused as one line too (it was a ValueError traceback).
    _prepare(g, documents[:2], overwrite=True, version=5)
    with pytest.raises(CheckpointError, match=r"ep0-ba4\.pt: cannot resume: the checkpoint's sampler fingerprint"):
        Trainer(recipe(elsewhere), run)
