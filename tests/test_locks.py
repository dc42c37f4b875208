"""One writer per run directory: two `smalti train` on one folder used to resume from each other's checkpoints and
corrupt the ledger ("hash chain broken"). Real processes here: the second refuses in one line naming the first,
the first finishes with a ledger that verifies, a lock left by a killed process is taken over, and a deletion
neither writes into a folder in use nor reads a parent that is still training."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, smalti_cli, write_recipe
from test_ledger import ledger_recipe

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _start(recipe, run_dir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smalti", "train", str(recipe), "--run-dir", str(run_dir)],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _training(governed, tmp_path, steps: int, interval: int) -> tuple[Path, subprocess.Popen]:
    """A run training in its own process, once it holds its run directory's lock."""
    recipe = write_recipe(tmp_path / "r.yaml", ledger_recipe(governed, train={"max_duration": f"{steps}ba"},
                                                             checkpoint={"interval": f"{interval}ba"}))
    run = tmp_path / "run"
    process = _start(recipe, run)
    _wait_until_locked(run, process)
    return recipe, process


def _wait_until_locked(run_dir, process) -> None:
    lock = run_dir / ".smalti.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.stat().st_size and (run_dir / "checkpoints").is_dir()):
        assert process.poll() is None, process.stderr.read()
        assert time.time() < deadline, "the first run never took its lock"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_writer_refuses_in_one_line_and_the_first_run_is_intact(governed, tmp_path):
    run = tmp_path / "run"
    recipe, first = _training(governed, tmp_path, 20000, 25)
    try:
        second = smalti_cli("train", str(recipe), "--run-dir", str(run))
        assert second.returncode != 0
        assert len(second.stderr.strip().splitlines()) == 1, second.stderr
        assert f"in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
        relative = smalti_cli("train", str(recipe), "--run-dir", os.path.relpath(run, REPO))  # the same folder
        assert relative.returncode != 0 and "in use by pid" in relative.stderr, relative.stdout[-1500:]
        out = tmp_path / "forgot"
        forget = smalti_cli("forget", str(run), "--class", "gutenberg/comedy/tempest", "--out", str(out))
        assert forget.returncode != 0 and "in use by pid" in forget.stderr and "read it when" in forget.stderr
        assert len(forget.stderr.strip().splitlines()) == 1
        assert not (out / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: it keeps its last checkpoint and releases the folder
        assert first.wait(timeout=120) == 130, first.stderr.read()
    from smalti.trust.keys import PublicKey
    from smalti.governance.ledger.verify import verify_ledger

    report = verify_ledger(run, PublicKey.load(governed.keys / "trainer.pub"), in_progress=True)
    assert report.ok and report.entries > 25, report.problem  # nobody else wrote into it
    assert (run / ".smalti.lock").read_text() == ""  # released cleanly: it names no holder


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over_and_the_run_resumes(governed, tmp_path):
    run = tmp_path / "run"
    recipe, first = _training(governed, tmp_path, 40, 5)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert f'"pid": {first.pid}' in (run / ".smalti.lock").read_text()  # the dead holder is still named
    resumed = smalti_cli("train", str(recipe), "--run-dir", str(run))
    assert resumed.returncode == 0, resumed.stderr
    assert f"pid {first.pid}" in resumed.stderr and "ended without releasing" in resumed.stderr
    assert smalti_cli("ledger", "verify", str(run)).returncode == 0


def test_the_lock_is_reentrant_in_a_process_and_a_shared_check_creates_nothing(tmp_path):
    from smalti.locks import FolderLock, LockHeld

    path = tmp_path / "run" / ".smalti.lock"
    with FolderLock(path, "outer"):
        with FolderLock(path, "inner"):  # the trainer inside a deletion that holds the folder
            pass
        assert "outer" in path.read_text()
        child = subprocess.run([sys.executable, "-c", "import sys; from smalti.locks import FolderLock; "
                                f"FolderLock({str(path)!r}, 'other').acquire()"], capture_output=True, text=True,
                               cwd=REPO)
        assert child.returncode != 0 and "in use by pid" in child.stderr
    assert path.read_text() == ""
    with FolderLock(tmp_path / "elsewhere" / ".smalti.lock", "reading", shared=True):
        pass
    assert not (tmp_path / "elsewhere").exists()
    with FolderLock(path, "writer"):
        child = subprocess.run([sys.executable, "-c", "from smalti.locks import FolderLock; "
                                f"FolderLock({str(path)!r}, 'reader', shared=True).acquire()"],
                               capture_output=True, text=True, cwd=REPO)
        assert child.returncode != 0 and "LockHeld" in child.stderr
    assert LockHeld
