"""From a clone to a team's own project: `python -m build` makes a wheel and an sdist from the tracked files, and the
wheel installs in a fresh virtual environment and runs, with the files the service serves and the extras the README
lists."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow
EXTRAS = {"hf", "signing", "serve", "pkcs11", "remote", "eval", "vision", "tensorboard", "wandb", "mlflow", "all"}


def test_a_wheel_and_an_sdist_build_and_the_wheel_installs_and_runs(tmp_path):
    source = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.split()
    for name in listed:  # what a fresh clone holds (and this change's new files), nothing built or ignored
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "--outdir",
                            str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel, = (tmp_path / "dist").glob("smalti-*.whl")
    sdist, = (tmp_path / "dist").glob("smalti-*.tar.gz")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"smalti/serve/static/app.js", "smalti/serve/static/index.html", "smalti/cli/main.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)
    assert EXTRAS <= {line.split(": ", 1)[1] for line in metadata.splitlines() if line.startswith("Provides-Extra")}
    assert "Requires-Dist: torch>=2.4" in metadata
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "README.md", "smalti/serve/static/app.js"} <= members

    fresh = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    installed = subprocess.run([fresh / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-deps",
                                "--disable-pip-version-check", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-2000:]
    # The dependencies come from this environment's site-packages, read as a plain path (its .pth files, the
    # editable install of this checkout among them, are not processed): smalti itself is the wheel's.
    env = {"PATH": f"{fresh / 'bin'}", "PYTHONPATH": sysconfig.get_paths()["purelib"], "HOME": str(tmp_path)}
    version = subprocess.run([fresh / "bin" / "smalti", "--version"], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("smalti "), version.stderr
    where = subprocess.run([fresh / "bin" / "python", "-c", "import pathlib, smalti.serve as s; "
                            "print(s.__file__); assert (pathlib.Path(s.__file__).parent / 'static' / 'app.js').is_file()"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert where.returncode == 0 and str(fresh) in where.stdout, where.stderr
    keys = subprocess.run([fresh / "bin" / "smalti", "keys", "new", "someone", "--dir", str(tmp_path / "keys")],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert keys.returncode == 0 and (tmp_path / "keys" / "someone.pub").is_file(), keys.stderr
