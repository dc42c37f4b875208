"""Shared fixtures: a tiny corpus cut from the real plays, and recipes small enough to train in seconds."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import yaml
from filelock import FileLock

REPO = Path(__file__).resolve().parent.parent
SHAKESPEARE = REPO / "data" / "shakespeare"
# Bitwise comparisons need a fixed summation order: one intra-op thread, in this process and in
# every subprocess the tests start (a busy machine can otherwise change how work is split).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_DYNAMIC"] = "FALSE"

TINY_WORKS = {"hamlet": "tragedy", "macbeth": "tragedy", "tempest": "comedy", "sonnets": "poetry"}


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """A read-only folder that ``build`` fills once for the whole session, shared by every xdist worker.

    The suite runs in two worker processes (``-n 2``, see the Makefile); without this each would
    rebuild the session's keys, dataset and Go checker. The first worker to arrive builds it under a
    file lock (in place: what is built may record its own path) and marks it complete; the others
    wait and reuse it. A build that failed halfway is started over.
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the folder all workers' base temps share
    target = base / f"shared-{name}"
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").exists():
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            build(target)
            (target / ".complete").touch()
    return target


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four works, 6,000 characters each (from the middle of the real texts), with a manifest."""
    return built_once(tmp_path_factory, "tiny_corpus", _write_tiny_corpus)


def _write_tiny_corpus(root: Path) -> None:
    rows = []
    for work, genre in TINY_WORKS.items():
        text = gzip.decompress((SHAKESPEARE / f"{work}.txt.gz").read_bytes()).decode("utf-8")
        excerpt = text[20_000:26_000]
        (root / f"{work}.txt").write_text(excerpt, encoding="utf-8")
        digest = hashlib.sha256(excerpt.encode("utf-8")).hexdigest()
        rows.append({"work": work, "title": work.title(), "genre": genre, "sha256": digest})
    with open(root / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["work", "title", "genre", "sha256"])
        writer.writeheader()
        writer.writerows(rows)


def tiny_recipe(corpus: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict for a 2-layer, 32-wide GPT; ``sections`` update it section by section."""
    recipe: dict[str, Any] = {
        "seed": 3,
        "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "block_size": 16},
        "data": {"corpus": str(corpus)},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "scheduler": {"warmup": "4ba"},
        # CPU unless a test asks for CUDA: bitwise expectations and tolerances are the CPU's, on any machine.
        "train": {"max_duration": "24ba", "global_batch_size": 8, "device": "cpu"},
        "eval": {"interval": "8ba", "max_samples": 32, "batch_size": 16},
        "checkpoint": {"interval": "8ba", "keep": 2},
        "logging": {"console": False},
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(name), dict):
            recipe[name] = {**recipe[name], **values}
        else:
            recipe[name] = values
    return recipe


def write_recipe(path: Path, recipe: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def smalti_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the real command line (``python -m smalti ARGS``) in its own process, single-threaded (see the top of
    this file): a child forked from ``cli_zygote``, which imported torch once for the whole worker; a fresh
    interpreter where ``env`` sets a ``PYTHON*`` variable, or everywhere with ``SMALTI_TEST_FRESH_CLI=1``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # What the interpreter reads as it starts (PYTHONPATH shadowing a package, ...) needs one that starts afresh.
    starts_differently = any(k.startswith("PYTHON") and k != "PYTHONUNBUFFERED" for k in env or {})
    if starts_differently or os.environ.get("SMALTI_TEST_FRESH_CLI") == "1":
        return subprocess.run([sys.executable, "-m", "smalti", *args], capture_output=True, text=True,
                              env=full_env, timeout=timeout, cwd=REPO)
    return _ZYGOTE.run(list(args), full_env, timeout)


class _Zygote:
    """``tests/cli_zygote.py``, started on first use in each test process and ended with it."""

    def __init__(self) -> None:
        import threading

        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _started(self) -> subprocess.Popen:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cli_zygote.py"))],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
            assert self.process.stdout is not None
            assert json.loads(self.process.stdout.readline()) == {"ready": True}
        return self.process

    def run(self, args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
        import tempfile

        out = Path(tempfile.mkdtemp(prefix="smalti-cli-"))
        try:
            with self.lock:
                process = self._started()
                assert process.stdin is not None and process.stdout is not None
                process.stdin.write(json.dumps({"args": args, "cwd": str(REPO), "env": env, "out": str(out)}) + "\n")
                process.stdin.flush()
                pid = json.loads(process.stdout.readline())["pid"]
            deadline, rc = time.monotonic() + timeout, out / "rc"
            while not rc.exists():
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:  # gone without an exit code: killed by a signal
                    if rc.exists():
                        break
                    return subprocess.CompletedProcess(["smalti", *args], -9, *self._streams(out))
                if time.monotonic() > deadline:
                    os.kill(pid, 9)
                    raise subprocess.TimeoutExpired(["smalti", *args], timeout)
                time.sleep(0.005)
            return subprocess.CompletedProcess(["smalti", *args], int(rc.read_text()), *self._streams(out))
        finally:
            shutil.rmtree(out, ignore_errors=True)

    @staticmethod
    def _streams(out: Path) -> tuple[str, str]:
        read = lambda name: (out / name).read_text(errors="replace") if (out / name).exists() else ""  # noqa: E731
        return read("stdout"), read("stderr")

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()  # type: ignore[union-attr]
            self.process.wait(timeout=30)


_ZYGOTE = _Zygote()


@pytest.fixture(scope="session", autouse=True)
def _end_the_cli_zygote():
    yield
    _ZYGOTE.close()


# ---------------------------------------------------------------- governed data


@dataclasses.dataclass(frozen=True)
class Governed:
    """Keys, a signed taxonomy and a prepared, signed dataset made from the tiny corpus."""

    root: Path
    keys: Path
    taxonomy: Path
    dataset: Path

    @property
    def trust(self) -> Path:
        return self.keys / "data-governance.pub"

    def key(self, name: str) -> Path:
        return self.keys / f"{name}.key"

    def recipe(self, **sections: dict[str, Any]) -> dict[str, Any]:
        data = {"corpus": None, "url": str(self.dataset), "taxonomy": str(self.taxonomy), "trust": str(self.trust),
                "cache_dir": str(self.root / "cache")}
        data.update(sections.pop("data", {}))
        return tiny_recipe(Path("unused"), data=data, **sections)


CLASS_TEMPLATE = "gutenberg/{genre}/{work}"


def make_governance(root: Path, corpus: Path, shard_examples: int = 200, deletable: tuple[str, ...] = (),
                    evaluator: bool = False) -> Governed:
    from smalti.data.prepare import PrepareOptions, prepare_dataset
    from smalti.data.sources import classes_from_mapping, documents_from_folder
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.trust.taxonomy import Taxonomy, taxonomy_yaml

    keys = root / "keys"
    for name in ("data-governance", "tagger", "comedy-tagger", "model-risk", "trainer") + (("evaluator",) * evaluator):
        write_key_pair(name, keys)
    pub = lambda name: PublicKey.load(keys / f"{name}.pub").text  # noqa: E731
    authorities = {
        "data-governance": {"role": "data-governance", "key": pub("data-governance")},
        "tagger": {"role": "tagging", "key": pub("tagger"), "may_tag": ["gutenberg"]},
        "comedy-tagger": {"role": "tagging", "key": pub("comedy-tagger"), "may_tag": ["gutenberg/comedy"]},
        "model-risk": {"role": "model-risk", "key": pub("model-risk")},
        "trainer": {"role": "trainer", "key": pub("trainer")},
    }
    if evaluator:
        authorities["lab-evals"] = {"role": "evaluator", "key": pub("evaluator")}
    classes = classes_from_mapping(corpus / "manifest.csv", CLASS_TEMPLATE)
    taxonomy_path = root / "taxonomy.yaml"
    taxonomy_path.write_text(taxonomy_yaml("tiny", classes + ["gutenberg/history"], authorities, list(deletable)), encoding="utf-8")
    signature = sign_bytes(taxonomy_path.read_bytes(), SigningKey.load(keys / "data-governance.key"))
    (root / "taxonomy.yaml.sig").write_text(signature.to_json(), encoding="utf-8")
    taxonomy = Taxonomy.load(taxonomy_path, PublicKey.load(keys / "data-governance.pub"))
    prepare_dataset(
        documents_from_folder(corpus, template=CLASS_TEMPLATE),
        taxonomy,
        SigningKey.load(keys / "tagger.key"),
        str(root / "dataset"),
        PrepareOptions(name="tiny", seq_len=16, shard_examples=shard_examples),
        show_progress=False,
    )
    return Governed(root=root, keys=keys, taxonomy=taxonomy_path, dataset=root / "dataset")


@pytest.fixture(scope="session")
def governed(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Governed:
    root = built_once(tmp_path_factory, "governed", lambda partial: make_governance(partial, tiny_corpus))
    return Governed(root=root, keys=root / "keys", taxonomy=root / "taxonomy.yaml", dataset=root / "dataset")


@pytest.fixture(scope="session")
def evaluated_governance(tmp_path_factory, tiny_corpus) -> Governed:
    """The governed fixture's data and authorities, plus an evaluator (``lab-evals``) in the taxonomy."""
    root = built_once(tmp_path_factory, "governed-evaluator",
                      lambda partial: make_governance(partial, tiny_corpus, evaluator=True))
    return Governed(root=root, keys=root / "keys", taxonomy=root / "taxonomy.yaml", dataset=root / "dataset")


@pytest.fixture
def governed_copy(governed: Governed, tmp_path: Path) -> Governed:
    """A private copy to tamper with."""
    root = tmp_path / "governed"
    shutil.copytree(governed.root, root)
    return Governed(root=root, keys=root / "keys", taxonomy=root / "taxonomy.yaml", dataset=root / "dataset")


# ---------------------------------------------------------------- real servers on loopback


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


@pytest.fixture
def http_server():
    """Serve a folder over real HTTP on loopback; stopped after the test."""
    processes = []

    def serve(folder):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        wait_for_port(port, process)
        return f"http://127.0.0.1:{port}"

    yield serve
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def s3_server(monkeypatch):
    """A real S3-compatible server (moto in server mode) on loopback; stopped after the test."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, process)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="corpora")
    yield endpoint
    process.terminate()
    process.wait(timeout=10)


def write_policy(g: Governed, path: Path, rules: list, exclusive: list | None = None, default: str = "allow",
                 sign_with: str | None = "model-risk", **extra: Any) -> Path:
    """A policy bound to the governed taxonomy, signed by the model-risk key (or another, or none)."""
    from smalti.trust.keys import SigningKey, sign_bytes
    from smalti.trust.taxonomy import Taxonomy

    taxonomy = Taxonomy.parse(g.taxonomy.read_bytes(), str(g.taxonomy))
    spec = {"policy": path.stem, "taxonomy": {"name": taxonomy.name, "fingerprint": taxonomy.fingerprint},
            "default": default, "rules": rules, "exclusive": exclusive or [], **extra}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    if sign_with is not None:
        signature = sign_bytes(path.read_bytes(), SigningKey.load(g.key(sign_with)))
        path.with_name(path.name + ".sig").write_text(signature.to_json(), encoding="utf-8")
    return path


FILE_SECONDS = json.loads((Path(__file__).with_name("file_seconds.json")).read_text())


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first, by the times in ``file_seconds.json`` (``tests/file_seconds.py`` remakes it).

    Under xdist (``make test``) each worker takes a file at a time. A long file dealt out last runs alone
    at the end while the other core idles; dealt out longest first, the files pack the two workers to
    within the shortest files' time. A file the table does not know yet counts as 60 s if it is marked
    slow as a whole and 5 s otherwise. A stable sort, file by file: each file's tests keep their order.
    """

    def slow_file(item: pytest.Item) -> bool:
        marks = getattr(getattr(item, "module", None), "pytestmark", [])
        return any(getattr(mark, "name", None) == "slow" for mark in (marks if isinstance(marks, list) else [marks]))

    def seconds(item: pytest.Item) -> float:
        name = Path(str(item.fspath)).relative_to(REPO).as_posix()
        return FILE_SECONDS.get(name, 60.0 if slow_file(item) else 5.0)

    items.sort(key=lambda item: -seconds(item))
