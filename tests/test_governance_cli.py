"""The key, signature, taxonomy and data commands, through the real command line."""

import json
import stat
import subprocess

from smalti.cli.main import main
from smalti.trust.keys import PublicKey, SigningKey

from conftest import CLASS_TEMPLATE, smalti_cli


def test_keys_new_writes_a_private_0600_key_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keys", "new", "trainer", "--dir", str(tmp_path / "keys")]) == 0
    private, public = tmp_path / "keys" / "trainer.key", tmp_path / "keys" / "trainer.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = PublicKey.load(public)
    assert SigningKey.load(private).public == key and key.text.startswith("ed25519:")
    assert key.key_id in capsys.readouterr().out
    assert main(["keys", "new", "trainer", "--dir", str(tmp_path / "keys")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err


def test_sign_and_verify(tmp_path, capsys):
    main(["keys", "new", "alice", "--dir", str(tmp_path)])
    main(["keys", "new", "mallory", "--dir", str(tmp_path)])
    document = tmp_path / "policy.yaml"
    document.write_text("default: deny\n")
    assert main(["sign", str(document), "--key", str(tmp_path / "alice.key")]) == 0
    assert main(["verify", str(document), "--pubkey", str(tmp_path / "alice.pub")]) == 0
    assert "good signature" in capsys.readouterr().out
    assert main(["verify", str(document), "--pubkey", str(tmp_path / "mallory.pub")]) == 1
    assert "expected key" in capsys.readouterr().err
    document.write_text("default: allow\n")
    assert main(["verify", str(document), "--pubkey", str(tmp_path / "alice.pub")]) == 1
    assert "does not match the content" in capsys.readouterr().err
    (tmp_path / "policy.yaml.sig").unlink()
    assert main(["verify", str(document), "--pubkey", str(tmp_path / "alice.pub")]) == 1
    assert "not signed" in capsys.readouterr().err


def test_signature_is_checkable_with_openssl(tmp_path):
    """Detached signatures are plain Ed25519 over the file's bytes: standard tools agree."""
    main(["keys", "new", "alice", "--dir", str(tmp_path)])
    document = tmp_path / "doc.txt"
    document.write_text("hello\n")
    main(["sign", str(document), "--key", str(tmp_path / "alice.key")])
    signature = json.loads((tmp_path / "doc.txt.sig").read_text())["signature"]
    import base64

    (tmp_path / "doc.sig.bin").write_bytes(base64.b64decode(signature))
    public_pem = tmp_path / "alice.pem"
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "alice.key"), "-pubout", "-out", str(public_pem)], check=True)
    done = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(public_pem), "-rawin",
                           "-in", str(document), "-sigfile", str(tmp_path / "doc.sig.bin")], capture_output=True, text=True)
    assert done.returncode == 0 and "Verified Successfully" in done.stdout


def test_taxonomy_init_sign_show_and_prepare_verify(tmp_path, tiny_corpus):
    keys = tmp_path / "keys"
    for name in ("data-governance", "tagger"):
        assert smalti_cli("keys", "new", name, "--dir", str(keys)).returncode == 0
    taxonomy = tmp_path / "taxonomy.yaml"
    made = smalti_cli(
        "taxonomy", "init", str(taxonomy), "--name", "tiny", "--classes-from", str(tiny_corpus / "manifest.csv"),
        "--class-template", CLASS_TEMPLATE, "--data-governance", str(keys / "data-governance.pub"),
        "--tagger", f"tagger={keys / 'tagger.pub'}:gutenberg", "--deletable", "gutenberg/tragedy/hamlet",
    )
    assert made.returncode == 0, made.stderr
    unsigned = smalti_cli("taxonomy", "show", str(taxonomy))
    assert unsigned.returncode == 1 and "not signed" in unsigned.stderr
    assert smalti_cli("sign", str(taxonomy), "--key", str(keys / "data-governance.key")).returncode == 0
    shown = smalti_cli("taxonomy", "show", str(taxonomy), "--trust", str(keys / "data-governance.pub"))
    assert shown.returncode == 0 and "hamlet" in shown.stdout and "deletable" in shown.stdout

    dataset = tmp_path / "dataset"
    common = ["--taxonomy", str(taxonomy), "--trust", str(keys / "data-governance.pub")]
    prepared = smalti_cli("data", "prepare", "--source", str(tiny_corpus), "--class-template", CLASS_TEMPLATE,
                           "--key", str(keys / "tagger.key"), "--out", str(dataset), "--seq-len", "16", *common)
    assert prepared.returncode == 0, prepared.stderr
    again = smalti_cli("data", "prepare", "--source", str(tiny_corpus), "--class-template", CLASS_TEMPLATE,
                        "--key", str(keys / "tagger.key"), "--out", str(dataset), "--seq-len", "16", *common)
    assert again.returncode == 1 and "already holds a prepared dataset" in again.stderr
    verified = smalti_cli("data", "verify", str(dataset), *common)
    assert verified.returncode == 0 and "gutenberg/poetry/sonnets" in verified.stdout and "total" in verified.stdout

    wrong_key = smalti_cli("data", "prepare", "--source", str(tiny_corpus), "--class-template", CLASS_TEMPLATE,
                            "--key", str(keys / "data-governance.key"), "--out", str(tmp_path / "other"), *common)
    assert wrong_key.returncode == 1 and "is not a tagging authority" in wrong_key.stderr
    assert not (tmp_path / "other").exists()
    unknown = smalti_cli("data", "prepare", "--source", str(tiny_corpus), "--class-template", "gutenberg/{work}",
                          "--key", str(keys / "tagger.key"), "--out", str(tmp_path / "other"), *common)
    assert unknown.returncode == 1 and "class 'gutenberg/hamlet' is not in taxonomy" in unknown.stderr


def test_prepare_is_deterministic(tmp_path, governed, tiny_corpus):
    out = tmp_path / "again"
    done = smalti_cli("data", "prepare", "--source", str(tiny_corpus), "--class-template", CLASS_TEMPLATE,
                       "--taxonomy", str(governed.taxonomy), "--key", str(governed.key("tagger")),
                       "--out", str(out), "--seq-len", "16", "--shard-examples", "200", "--name", "tiny")
    assert done.returncode == 0, done.stderr
    for path in sorted(governed.dataset.iterdir()):
        assert (out / path.name).read_bytes() == path.read_bytes(), path.name


def test_prepare_from_a_jsonl_table(tmp_path, governed):
    table = tmp_path / "table.jsonl"
    rows = [{"id": f"doc{i}", "text": "To be, or not to be, that is the question. " * 8,
             "class": "gutenberg/tragedy/hamlet" if i % 2 else "gutenberg/comedy/tempest"} for i in range(6)]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = smalti_cli("data", "prepare", "--source", str(table), "--id-column", "id", "--taxonomy",
                       str(governed.taxonomy), "--key", str(governed.key("tagger")), "--out", str(tmp_path / "ds"),
                       "--seq-len", "16")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert set(manifest["splits"]["train"]["class_counts"]) == {"gutenberg/tragedy/hamlet", "gutenberg/comedy/tempest"}


def test_prepare_from_a_parquet_table(tmp_path, governed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["Now is the winter of our discontent made glorious summer. " * 6, "Full fathom five thy father lies. " * 9]
    pq.write_table(pa.table({"body": texts, "label": ["gutenberg/history", "gutenberg/comedy/tempest"]}),
                   tmp_path / "table.parquet")
    done = smalti_cli("data", "prepare", "--source", str(tmp_path / "table.parquet"), "--text-column", "body",
                       "--class-column", "label", "--taxonomy", str(governed.taxonomy), "--key", str(governed.key("tagger")),
                       "--out", str(tmp_path / "ds"), "--seq-len", "16")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert set(manifest["splits"]["train"]["class_counts"]) == {"gutenberg/history", "gutenberg/comedy/tempest"}
    assert smalti_cli("data", "verify", str(tmp_path / "ds"), "--taxonomy", str(governed.taxonomy)).returncode == 0
