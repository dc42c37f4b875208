"""serve_load: `smalti serve` under concurrent auditors, on loopback.

Trains a baby-GPT run with the ledger, starts `smalti serve` over it, and holds C concurrent clients
(aiohttp, each logged in once with a signed challenge, then reading with its session cookie) for S
seconds per case: inclusion proofs of random steps (every one checked: the Merkle path to the signed
root, and the head's signature by the trainer key) and forensic queries (layer -> classes). With
--train-while a second run trains into the same folder meanwhile. Prints one JSON line:

  {"benchmark": "serve_load", "proofs_per_s_200": proofs answered per second at the largest client count,
   "p99_ms": worst p99 at the largest client count, "errors": N,
   "ratio": p99 at the largest client count / p99 at 1 client (the same kind), "cases": [...]}

errors counts failed requests, non-200 answers and proofs that do not verify; it must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def make_environment(root: Path, steps: int) -> dict:
    """Keys, a signed taxonomy naming an auditor, and a finished ledger run under root/runs/alpha."""
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes, write_key_pair
    from smalti.trust.taxonomy import taxonomy_yaml

    keys = root / "keys"
    for name in ("data-governance", "trainer", "auditor"):
        write_key_pair(name, keys)
    pub = lambda name: PublicKey.load(keys / f"{name}.pub").text  # noqa: E731
    taxonomy = root / "taxonomy.yaml"
    taxonomy.write_text(taxonomy_yaml("load", ["shakespeare/plays"], {
        "data-governance": {"role": "data-governance", "key": pub("data-governance")},
        "trainer": {"role": "trainer", "key": pub("trainer")},
        "auditor": {"role": "auditor", "key": pub("auditor")}}))
    (root / "taxonomy.yaml.sig").write_text(
        sign_bytes(taxonomy.read_bytes(), SigningKey.load(keys / "data-governance.key")).to_json())
    recipe = training_recipe(root, keys, steps)
    done = subprocess.run([sys.executable, "-m", "smalti", "train", str(recipe), "--run-dir", str(root / "runs/alpha")],
                          capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    return {"keys": keys, "taxonomy": taxonomy, "runs": root / "runs", "recipe": recipe}


def training_recipe(root: Path, keys: Path, steps: int) -> Path:
    import yaml

    recipe = {"seed": 1, "model": {"n_layer": 2, "n_head": 2, "d_model": 64, "block_size": 32},
              "data": {"corpus": str(REPO / "data" / "shakespeare")},
              "train": {"max_duration": f"{steps}ba", "global_batch_size": 8, "device": "cpu"},
              "eval": {"interval": "1000000ba", "max_samples": 16}, "checkpoint": {"interval": "5ba", "keep": 2},
              "governance": {"ledger": {"enabled": True, "key": str(keys / "trainer.key"), "entropy_every": 0}},
              "logging": {"console": False}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def start_server(env: dict, port: int) -> subprocess.Popen:
    import socket

    process = subprocess.Popen([sys.executable, "-m", "smalti", "serve", str(env["runs"]), "--taxonomy",
                                str(env["taxonomy"]), "--trust", str(env["keys"] / "data-governance.pub"),
                                "--listen", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               cwd=REPO)
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"smalti serve exited: {process.stderr.read().decode()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    raise SystemExit("smalti serve did not start")


async def _login(session, base: str, key) -> str:
    """A sign-in code as `smalti auditor sign-in` makes it (the challenge signed for this origin), for a session:
    its cookie stays in ``session``'s jar, its other half is returned for the X-Smalti-Session header."""
    from smalti.serve.auth import login_message

    async with session.get(f"{base}/api/login/challenge") as response:
        challenge = (await response.json())["challenge"]
    signature = base64.urlsafe_b64encode(key.sign(login_message(base, challenge))).decode().rstrip("=")
    async with session.post(f"{base}/api/login", json={"code": f"{challenge}.{key.public.key_id}.{signature}"}) \
            as response:
        if response.status != 200:
            raise RuntimeError(f"login: {response.status} {await response.text()}")
        return (await response.json())["session"]  # the session's second half, sent as a header


def check_proof(proof: dict, trainer) -> bool:
    from smalti.trust import merkle
    from smalti.trust.entry import TreeHead

    head = proof["tree_head"]
    leaf = merkle.leaf_hash(base64.b64decode(proof["entry_base64"]))
    return (merkle.verify_inclusion(proof["leaf_index"], proof["tree_size"], leaf,
                                    [bytes.fromhex(p) for p in proof["audit_path"]], bytes.fromhex(head["root"]))
            and TreeHead.states_itself(head) and trainer.verify(bytes.fromhex(head["signature"]), head["message"].encode()))


async def load(base: str, key, trainer, kind: str, clients: int, seconds: float, steps: int, layers: list[str]) -> dict:
    """``clients`` concurrent readers for ``seconds``: latencies (ms) and errors."""
    import aiohttp

    latencies: list[float] = []
    errors: list[str] = []
    signing_in = asyncio.Lock()
    stop = time.perf_counter() + seconds

    async def reader(index: int) -> None:
        rng = random.Random(index)
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async with signing_in:  # one at a time: one address may hold only a few unanswered challenges
                headers = {"X-Smalti-Session": await _login(session, base, key)}
            while time.perf_counter() < stop:
                if kind == "proof":
                    path = f"/api/runs/alpha/proof/inclusion?step={rng.randint(1, steps)}"
                else:
                    path = f"/api/runs/alpha/audit/layer?name={rng.choice(layers)}"
                started = time.perf_counter()
                try:
                    async with session.get(base + path, headers=headers) as response:
                        body = await response.read()
                        latencies.append((time.perf_counter() - started) * 1000)
                        if response.status != 200:
                            errors.append(f"{response.status} {path}")
                        elif kind == "proof" and not check_proof(json.loads(body), trainer):
                            errors.append(f"proof does not verify: {path}")
                        elif kind == "query":
                            json.loads(body)
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
                    errors.append(f"{type(error).__name__} {path}")

    await asyncio.gather(*(reader(i) for i in range(clients)))
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")  # noqa: E731
    return {"kind": kind, "clients": clients, "requests": len(latencies), "rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(pick(0.50), 2), "p99_ms": round(pick(0.99), 2), "errors": len(errors),
            "first_errors": errors[:3]}


def measure(env: dict, clients: list[int], seconds: float, train_while: bool, port: int,
            kinds: tuple[str, ...] = ("proof", "query")) -> dict:
    from smalti.trust.keys import PublicKey, SigningKey
    from smalti.governance.ledger.audit import Ledger

    server = start_server(env, port)
    trainer_run = None
    try:
        key, trainer = SigningKey.load(env["keys"] / "auditor.key"), PublicKey.load(env["keys"] / "trainer.pub")
        ledger = Ledger.load(env["runs"] / "alpha", read_only=True)
        steps, layers = len(ledger.steps), ledger.layer_names
        if train_while:  # a second run trains into the same folder while the auditors read
            trainer_run = subprocess.Popen([sys.executable, "-m", "smalti", "train", str(env["recipe"]), "--run-dir",
                                            str(env["runs"] / "beta"), "--set", "train.max_duration=100000ba"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        cases = [asyncio.run(load(f"http://127.0.0.1:{port}", key, trainer, kind, n, seconds, steps, layers))
                 for n in clients for kind in kinds]
    finally:
        if trainer_run is not None:
            trainer_run.terminate()
            trainer_run.wait(timeout=60)
        server.terminate()
        server.wait(timeout=30)
    largest = max(clients)
    worst = max(c["p99_ms"] for c in cases if c["clients"] == largest)
    single = [c["p99_ms"] for c in cases if c["clients"] == min(clients)]
    proofs = [c["rps"] for c in cases if c["clients"] == largest and c["kind"] == "proof"]
    return {"benchmark": "serve_load", "proofs_per_s_200": proofs[0] if proofs else None, "p99_ms": worst,
            "errors": sum(c["errors"] for c in cases),
            "ratio": round(worst / max(statistics.median(single), 1e-9), 2), "seconds_per_case": seconds,
            "train_while": train_while, "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,50,200", help="comma-separated client counts (default 1,50,200)")
    parser.add_argument("--seconds", type=float, default=60.0, help="per case (default 60)")
    parser.add_argument("--steps", type=int, default=60, help="steps of the served run (default 60)")
    parser.add_argument("--train-while", action="store_true", help="train a second run into the folder meanwhile")
    args = parser.parse_args()
    from common import emit, free_port, machine

    with tempfile.TemporaryDirectory() as folder:
        env = make_environment(Path(folder), args.steps)
        result = measure(env, [int(c) for c in args.clients.split(",")], args.seconds, args.train_while, free_port())
    emit({**result, "machine": machine()})


if __name__ == "__main__":
    main()
