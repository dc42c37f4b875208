"""cli_startup: the command line stays fast where no model is involved.

A team's whole session, as the README walks it (``USER_SESSION``), is replayed command by command in fresh
interpreters: keys, the taxonomy, data preparation and verification, the ledger, audits, publishing, a witness,
signed-model verification, the audit service and the auditor's client. The commands that train, sample, evaluate
or export a model (``MODEL_COMMANDS``) run plainly; every other command runs under a probe that reports, when the
command ends, whether ``torch`` was ever imported.

- ``torch_free_commands``: the fraction of the non-model commands that never imported torch. Goal: 1.0.
- ``ledger_verify_s``: ``smalti ledger verify RUN --pubkey PUB`` of a 100-entry run as a whole process (the
  interpreter starting, the imports, the check), median of ``--repeats``. Goal: <= 0.6 s.
- ``ratio``: that over ``python -c pass`` on the same interpreter, timed in the same run: what Smalti adds to
  starting Python at all.

``tests/test_cli_startup.py`` replays the same session on the test corpus and fails naming any command that
imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
MODEL_COMMANDS = ("train", "sample", "eval", "eval-forget", "evaluate", "forget", "export")
MARK = "smalti-probe: torch imported="
# Runs the real entry point, then says whether torch was ever imported; also on SIGTERM (the service).
PROBE = (
    "import signal, sys\n"
    "from smalti.cli.main import main\n"
    "def report(*_):\n"
    f"    sys.stderr.write('\\n{MARK}%s\\n' % ('torch' in sys.modules)); sys.stderr.flush()\n"
    "signal.signal(signal.SIGUSR1, report)\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as exit:\n"
    "    code = exit.code\n"
    "report()\n"
    "sys.exit(code)\n"
)


@dataclass
class Outcome:
    command: str
    returncode: int
    torch: bool | None  # None: the probe never reported
    seconds: float
    stderr: str = field(repr=False, default="")


def probe(args: list[str], cwd: Path) -> Outcome:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return Outcome(command_name(args), done.returncode, _reported(done.stderr), time.perf_counter() - started,
                   done.stderr[-1500:])


def command_name(args: list[str]) -> str:
    """``ledger verify``, ``audit --report``: the words of a command line, without its paths and values."""
    return " ".join(a for a in args[:3] if a.startswith("--") or a.replace("-", "").isalpha())


def _reported(stderr: str) -> bool | None:
    marks = [line for line in stderr.splitlines() if line.startswith(MARK)]
    return marks[-1].removeprefix(MARK) == "True" if marks else None


def plain(args: list[str], cwd: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "smalti", *args], capture_output=True, text=True, cwd=cwd)
    if done.returncode != 0:
        raise RuntimeError(f"smalti {' '.join(args)}: {done.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def probed_service(args: list[str], cwd: Path, port: int) -> Iterator[list[Outcome]]:
    """``smalti serve`` under the probe while the caller talks to it; its outcome is appended on the way out."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", PROBE, *args], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    outcomes: list[Outcome] = []
    try:
        for _ in range(400):
            if process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield outcomes
    finally:
        if process.poll() is None:
            process.send_signal(10)  # SIGUSR1: the probe reports while the service still runs
            time.sleep(0.5)
            process.terminate()
        _, stderr = process.communicate(timeout=30)
        code = process.returncode if process.returncode not in (-15, 0) else 0
        outcomes.insert(0, Outcome("serve", code, _reported(stderr), time.perf_counter() - started, stderr[-1500:]))


def user_session(root: Path, corpus: Path, recipe: dict) -> list[Outcome]:
    """Replay a team's session in ``root`` (relative paths, as a user types them); the probed outcomes, in order."""
    import yaml

    root.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    run = lambda *args: outcomes.append(probe(list(args), root))  # noqa: E731
    for name in ("data-governance", "tagger", "trainer", "auditor"):
        run("keys", "new", name, "--dir", "keys")
    run("keys", "new", "trainer-model", "--dir", "keys", "--type", "ecdsa-p256")
    template = "gutenberg/{genre}/{work}"
    run("taxonomy", "init", "taxonomy.yaml", "--name", "probe", "--classes-from", str(corpus / "manifest.csv"),
        "--class-template", template, "--data-governance", "keys/data-governance.pub",
        "--tagger", "tagger=keys/tagger.pub:gutenberg", "--trainer", "keys/trainer.pub",
        "--auditor", "auditor=keys/auditor.pub")
    run("sign", "taxonomy.yaml", "--key", "keys/data-governance.key")
    run("verify", "taxonomy.yaml", "--pubkey", "keys/data-governance.pub")
    run("taxonomy", "show", "taxonomy.yaml")
    trust = ("--taxonomy", "taxonomy.yaml", "--trust", "keys/data-governance.pub")
    run("data", "prepare", "--source", str(corpus), "--class-template", template, *trust, "--key", "keys/tagger.key",
        "--out", "dataset", "--name", "probe")
    run("data", "verify", "dataset", *trust)
    data = {**recipe.get("data", {}), "url": "dataset", "taxonomy": "taxonomy.yaml", "trust": "keys/data-governance.pub"}
    recipe = {**recipe, "data": data,
              "governance": {"ledger": {"enabled": True, "key": "keys/trainer.key", "entropy_every": 0}}}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    plain(["train", "recipe.yaml", "--run-dir", "runs/one"], root)
    pub = ("--pubkey", "keys/trainer.pub")
    run("ledger", "verify", "runs/one", *pub)
    run("ledger", "show", "runs/one")
    run("ledger", "proof", "runs/one", "--step", "2")
    run("ledger", "checkpoint", "runs/one")
    run("ledger", "export", "runs/one", "--out", "ledger.jsonl")
    run("ledger", "publish", "runs/one", "--to", "published")
    run("audit", "runs/one", "--class", "gutenberg", *pub)
    run("audit", "runs/one", "--layer", "model.embed_tokens", *pub)
    run("audit", "runs/one", "--report", "report.html", *pub)
    verifier = subprocess.run([sys.executable, "-m", "smalti", "ledger", "checkpoint", "runs/one", "--verifier-key"],
                              capture_output=True, text=True, cwd=root).stdout.strip()
    run("witness", "cosign", "published", "--key", "keys/auditor.key", "--state", "witness", "--log-key", verifier)
    plain(["export", "runs/one", "--out", "model", "--sign", "--model-key", "keys/trainer-model.key"], root)
    run("verify-model", "model", "--trainer-pubkey", "keys/trainer.pub", "--model-pubkey", "keys/trainer-model.pub")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    with probed_service(["serve", "runs", *trust, "--listen", f"127.0.0.1:{port}"], root, port) as served:
        auditor = ("--key", "keys/auditor.key")
        for args in (("sign-in",), ("runs",), ("verify", "one", "--trainer-key", "keys/trainer.pub"),
                     ("proof", "one", "--step", "2", "--trainer-key", "keys/trainer.pub"),
                     ("audit", "one", "--class", "gutenberg"), ("access-log",)):
            served.append(probe(["auditor", args[0], origin, *auditor, *args[1:]], root))
    return outcomes + served


def ledger_verify_seconds(root: Path, repeats: int) -> tuple[float, float]:
    """Whole-process ``smalti ledger verify`` of a 100-entry ledger, and ``python -c pass``: medians."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ledgers import build_ledger

    from smalti.trust.keys import SigningKey

    key = SigningKey.generate()
    build_ledger(root / "hundred", 100, key, head_every=50)
    (root / "hundred.pub").write_text(key.public.text)
    verify, bare = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "smalti", "ledger", "verify", str(root / "hundred"), "--pubkey",
                               str(root / "hundred.pub")], capture_output=True, text=True)
        verify.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise SystemExit(f"ledger verify failed: {done.stderr[-1000:]}")
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - started)
    return statistics.median(verify), statistics.median(bare)


# a Hugging Face model, since `export` writes Hugging Face folders (tiny: the session, not the model, is measured)
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32}
BENCH_RECIPE = {"seed": 1, "model": {"hf": {"config": TINY_LLAMA}}, "data": {"seq_len": 32},
                "train": {"max_duration": "8ba", "global_batch_size": 8, "device": "cpu"},
                "eval": {"interval": "1000000ba", "max_samples": 16}, "checkpoint": {"interval": "4ba", "keep": 2},
                "logging": {"console": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="whole-process timings of ledger verify (default 7)")
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "shakespeare",
                        help="the session's source texts: a folder with a manifest.csv (default: the bundled plays)")
    parser.add_argument("--session", type=Path, default=None,
                        help="replay the session in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "benchmarks"))
    from common import emit, machine

    with tempfile.TemporaryDirectory() as tmp:
        session = args.session.resolve() if args.session else Path(tmp) / "session"
        outcomes = user_session(session, args.corpus.resolve(), BENCH_RECIPE)
        failed = [o for o in outcomes if o.returncode != 0]
        if failed:
            raise SystemExit(f"smalti {failed[0].command} failed: {failed[0].stderr}")
        verify_s, python_s = ledger_verify_seconds(Path(tmp), args.repeats)
    free = [o for o in outcomes if o.torch is False]
    emit({
        "benchmark": "cli_startup",
        "ledger_verify_s": round(verify_s, 3),
        "goal": "ledger_verify_s <= 0.6, torch_free_commands == 1.0",
        "ratio": round(verify_s / python_s, 2),
        "python_startup_s": round(python_s, 3),
        "torch_free_commands": round(len(free) / len(outcomes), 3),
        "commands": len(outcomes),
        "importing_torch": sorted({o.command for o in outcomes if o.torch is not False}),
        "command_families": sorted({o.command.split()[0] for o in outcomes}),
        "median_command_s": round(statistics.median(o.seconds for o in outcomes if o.command != "serve"), 3),
        "machine": machine(),
    })


if __name__ == "__main__":
    main()
