import json

import pytest

from smalti.cli.main import main

from conftest import smalti_cli, tiny_recipe, write_recipe


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "sample" in out


def test_train_then_sample_end_to_end(tmp_path, tiny_corpus):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_corpus, logging={"console": True}))
    run_dir = tmp_path / "run"
    done = smalti_cli("train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=12ba")
    assert done.returncode == 0, done.stderr
    assert "summary" in done.stdout and "final eval/loss" in done.stdout
    assert "[ep0 ba8] eval/loss" in done.stderr  # progress goes to stderr, as lines when not a terminal
    again = smalti_cli("train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=12ba")
    assert again.returncode == 0 and "already complete" in again.stdout  # nothing left to do, still clean

    sampled = smalti_cli("sample", str(run_dir), "--prompt", "HAMLET.", "--tokens", "40", "--seed", "1")
    assert sampled.returncode == 0, sampled.stderr
    text = sampled.stdout.rstrip("\n")
    assert text.startswith("HAMLET.") and len(text) == len("HAMLET.") + 40
    same = smalti_cli("sample", str(run_dir), "--prompt", "HAMLET.", "--tokens", "40", "--seed", "1")
    assert same.stdout == sampled.stdout


def _one_line_error(result, pattern):
    import re

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("smalti: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_bad_recipe_key_exits_2_with_one_line(tmp_path, tiny_corpus):
    recipe = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tiny_corpus, train={"max_duraton": "2ba"}))
    result = smalti_cli("train", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    _one_line_error(result, r"bad\.yaml: unknown key 'train\.max_duraton' \(did you mean 'train\.max_duration'\?\)")
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path):
    result = smalti_cli("train", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    _one_line_error(result, r"nope\.yaml: recipe file not found")


def test_corrupt_checkpoint_is_one_line(tmp_path, tiny_corpus):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_corpus))
    run_dir = tmp_path / "run"
    assert smalti_cli("train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=8ba").returncode == 0
    checkpoint = run_dir / "checkpoints" / "ep0-ba8.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    result = smalti_cli("train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=16ba")
    _one_line_error(result, r"ep0-ba8\.pt: checkpoint is corrupt")
    _one_line_error(smalti_cli("sample", str(run_dir), "--prompt", "A"), r"ep0-ba8\.pt: checkpoint is corrupt")


def test_sample_errors(tmp_path, tiny_corpus):
    _one_line_error(smalti_cli("sample", str(tmp_path / "none"), "--prompt", "A"), r"run directory not found")
    (tmp_path / "empty").mkdir()
    _one_line_error(smalti_cli("sample", str(tmp_path / "empty"), "--prompt", "A"), r"no checkpoint yet")


def test_sample_rejects_unknown_characters_and_ema_without_ema(tmp_path, tiny_corpus):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_corpus))
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=2ba"]) == 0
    assert main(["sample", str(run_dir), "--prompt", "caf\u00e9"]) == 1
    assert main(["sample", str(run_dir), "--prompt", "A", "--weights", "ema"]) == 1


def test_sample_uses_ema_weights_when_present(tmp_path, tiny_corpus, capsys):
    config = tiny_recipe(tiny_corpus, algorithms={"ema": {"half_life": "2ba"}})
    recipe = write_recipe(tmp_path / "tiny.yaml", config)
    run_dir = tmp_path / "run"
    assert main(["train", str(recipe), "--run-dir", str(run_dir), "--set", "train.max_duration=6ba"]) == 0
    capsys.readouterr()
    outputs = {}
    for weights in ("raw", "ema", "auto"):
        assert main(["sample", str(run_dir), "--prompt", "A", "--tokens", "60", "--weights", weights]) == 0
        outputs[weights] = capsys.readouterr().out
    assert outputs["auto"] == outputs["ema"] != outputs["raw"]


def test_metrics_lines_name_their_time(tmp_path, tiny_corpus):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny_recipe(tiny_corpus))
    assert main(["train", str(recipe), "--run-dir", str(tmp_path / "run"), "--set", "train.max_duration=3ba"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all({"ep", "ba", "sp", "tok"} <= set(r) for r in records)


NO_TORCH_PROBE = """
import sys
from smalti.cli.main import main
for argv in {commands!r}:
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    assert code == 0, (argv, code)
print("torch" in sys.modules)
"""


def test_commands_that_need_no_model_never_import_torch(tmp_path):
    """--help, keys, signatures and ledger verification start without torch (seconds of CPU each time)."""
    import subprocess
    import sys

    from conftest import REPO
    from smalti.trust.keys import SigningKey, write_key_pair
    from test_ledger import _synthetic_ledger

    write_key_pair("trainer", tmp_path / "keys")
    _synthetic_ledger(tmp_path / "run", SigningKey.load(tmp_path / "keys" / "trainer.key"), 5, [5])
    (tmp_path / "file.txt").write_text("evidence")
    commands = [["--help"], ["--version"], ["train", "--help"], ["keys", "new", "auditor", "--dir", str(tmp_path / "keys")],
                ["sign", str(tmp_path / "file.txt"), "--key", str(tmp_path / "keys" / "trainer.key")],
                ["verify", str(tmp_path / "file.txt"), "--pubkey", str(tmp_path / "keys" / "trainer.pub")],
                ["ledger", "verify", str(tmp_path / "run"), "--pubkey", str(tmp_path / "keys" / "trainer.pub")]]
    done = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE.format(commands=commands)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout


def test_version_names_smalti_and_torch(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("smalti 0.") and f"torch {metadata.version('torch')}" in out
