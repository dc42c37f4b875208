"""`make demo-finetune` end to end, as a user runs it: the Makefile's own steps, with shorter training.

The demo's recipes are copied with their durations cut (the steps, keys, tokenizer, dataset, policy,
lineage, audits and both deletions are the real ones); everything is written in a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

SHORTER = {"finetune-base.yaml": {"train": {"max_duration": "12ba"}, "eval": {"interval": "12ba", "max_samples": 32},
                                  "checkpoint": {"interval": "6ba"}},
           "finetune-tragedies.yaml": {"train": {"max_duration": "8ba"}, "eval": {"interval": "8ba", "max_samples": 32},
                                       "checkpoint": {"interval": "4ba"}}}


def test_make_demo_finetune_runs_every_step(tmp_path, monkeypatch, capsys):
    (tmp_path / "recipes" / "governance").mkdir(parents=True)
    for name, changes in SHORTER.items():
        recipe = yaml.safe_load((REPO / "recipes" / name).read_text())
        for section, values in changes.items():
            recipe[section].update(values)
        (tmp_path / "recipes" / name).write_text(yaml.safe_dump(recipe))
    policy = "governance/finetune-policy.yaml"
    (tmp_path / "recipes" / policy).write_text((REPO / "recipes" / policy).read_text())
    for shared in ("data", "pyproject.toml", "constraints.txt"):  # the same files: make sees the install as done
        (tmp_path / shared).symlink_to(REPO / shared)
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "-f", str(REPO / "Makefile"), "-C", str(tmp_path), "demo-finetune",
                           f"VENV={venv}"], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "pip install" not in out  # nothing was installed into the test's environment
    assert "lineage OK: demo-finetune/tragedies <- " in out and "demo-finetune/base (init)" in out
    assert "inherited from " in out and "gutenberg/comedy/twelfth_night: 0 examples in no step" in out
    assert "forgot gutenberg/tragedy/hamlet (ablate)" in out and "forgot gutenberg/tragedy/macbeth (exact)" in out
    assert out.count("deletion certificate OK") == 2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "demo-finetune" / "export"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert model.config.model_type == "llama" and model.config.vocab_size >= len(tokenizer)
    assert (export / "adapters").is_dir()

    # recipes/moe-mixtral.yaml and recipes/mamba.yaml on the same dataset, through the command line's own entry
    # point (in this process: each fresh interpreter would spend seconds importing transformers again)
    from smalti.cli.main import main

    for name in ("moe-mixtral.yaml", "mamba.yaml", "governance/moe-policy.yaml"):
        (tmp_path / "recipes" / name).write_text((REPO / "recipes" / name).read_text())
    policy_comment = (REPO / "recipes" / "governance" / "moe-policy.yaml").read_text()
    commands = [line.removeprefix("#").strip() for line in policy_comment.splitlines() if line.startswith("#   ")
                or line.startswith("#     ")]
    commands = " ".join(commands).replace("\\ ", "").split("smalti ")[1:]
    assert [c.split()[0] for c in commands] == ["policy", "sign"], commands
    short = "--set eval.interval=2ba --set eval.max_samples=16 --set train.max_duration="
    monkeypatch.chdir(tmp_path)  # the commands' paths are relative, as the comment writes them
    for command in commands + [f"train recipes/moe-mixtral.yaml --run-dir demo-finetune/moe {short}2ba",
                               f"train recipes/mamba.yaml --run-dir demo-finetune/mamba {short}1ba",
                               "audit demo-finetune/moe --class gutenberg --json"]:
        capsys.readouterr()
        code = main(command.split())
        out = capsys.readouterr()
        assert code in (0, None), f"smalti {command}: {out.err[-2000:]}"
    reached = json.loads(out.out)["experts_reached"]
    assert list(reached) == [f"model.layers.{i}.mlp.experts" for i in range(4)]
    assert all(len(layer["tokens"]) == 8 for layer in reached.values())
    assert sum(sum(layer["tokens"]) for layer in reached.values()) > 0  # the classes trained were routed somewhere
    assert (tmp_path / "demo-finetune" / "mamba" / "ledger.sqlite").is_file()
