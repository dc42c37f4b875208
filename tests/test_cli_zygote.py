"""The suite's ``smalti_cli`` forks each command from a process that imported torch once (``tests/cli_zygote.py``).
It must stand in for ``python -m smalti`` exactly where tests look: exit codes, stdout and stderr kept apart, the
working directory, the environment the test gives. Compared here with fresh interpreters, command by command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO, smalti_cli, tiny_recipe, write_recipe


def fresh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smalti", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, timeout=120)


@pytest.mark.parametrize("case", ["ok", "usage", "bad-recipe", "not-found"])
def test_a_forked_command_answers_as_a_fresh_interpreter_does(tmp_path, tiny_corpus, case):
    bad = write_recipe(tmp_path / "bad.yaml", tiny_recipe(tiny_corpus, train={"max_duraton": "2ba"}))
    args = {"ok": ["keys", "new", "probe", "--dir", str(tmp_path / "keys-{}")],
            "usage": ["ledger", "verify"],
            "bad-recipe": ["train", str(bad), "--run-dir", str(tmp_path / "run")],
            "not-found": ["sample", str(tmp_path / "none"), "--prompt", "A"]}[case]
    runs = []
    for label, runner in (("way-one", fresh), ("way-two", smalti_cli)):
        done = runner(*[a.format(label) for a in args])
        runs.append((done.returncode, done.stdout.replace(label, "*"), done.stderr.replace(label, "*")))
    assert runs[0][0] == runs[1][0], runs
    if case == "ok":  # a fresh key each time: compare the shape, not the key id
        assert [line.split()[0] for line in runs[0][1].splitlines()] == [
            line.split()[0] for line in runs[1][1].splitlines()]
    else:
        assert runs[0][1:] == runs[1][1:]
        assert runs[1][0] != 0 and runs[1][2].strip()


def test_the_environment_a_test_gives_reaches_the_command(tmp_path):
    """The PKCS#11 module named by the test's environment, not the zygote's (which has none)."""
    (tmp_path / "file.txt").write_text("x")
    env = {"SMALTI_PKCS11_MODULE": str(tmp_path / "no-such-module.so"), "SMALTI_PKCS11_PIN": "1234"}
    done = smalti_cli("sign", str(tmp_path / "file.txt"), "--key", "pkcs11:token=t;object=o", env=env)
    assert done.returncode == 1 and f"PKCS#11 token 't' ({tmp_path / 'no-such-module.so'})" in done.stderr
    assert "SMALTI_PKCS11_MODULE" not in os.environ
