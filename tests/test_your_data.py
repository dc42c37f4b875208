"""docs/your-data.md, run as written: every shell block in order, in an empty folder, on a few hundred short records
(the doc's `acme/data.jsonl` shape), with its YAML blocks written to the files they name. The server block runs in
the background on a free port, and the auditor's commands talk to it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, free_port, wait_for_port
from test_holdout import short_documents

pytestmark = pytest.mark.slow
DOC = REPO / "docs" / "your-data.md"


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.M | re.S)]


def test_the_walkthrough_runs_as_written(tmp_path):
    work = tmp_path / "acme-project"
    (work / "acme").mkdir(parents=True)
    names = {"support/tickets": "tickets", "public/docs": "docs", "customer/pii": "customer-pii"}
    rows = [{"id": r["id"], "source": names[r["source"]], "text": r["text"]} for r in short_documents(100)]
    (work / "acme" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    port, server, ran = free_port(), None, []
    try:
        for language, body in blocks(DOC.read_text()):
            if language == "yaml" and body.startswith("# file: "):
                name = body.splitlines()[0].removeprefix("# file: ").strip()
                (work / name).write_text(body)
            if language != "bash":
                continue
            script = "\n".join(line for line in body.splitlines() if "skip-in-test" not in line)
            script = script.replace("127.0.0.1:8700", f"127.0.0.1:{port}")
            if script.lstrip().startswith("smalti serve"):
                server = subprocess.Popen(["bash", "-c", f"exec {script.split('#')[0]}"], cwd=work, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                wait_for_port(port, server)
                continue
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=900)
            ran.append(script)
            assert done.returncode == 0, f"{script}\n---\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    assert server is not None and len(ran) >= 10
    export = work / "export" / "ft-no-pii"
    assert (export / "model.sig").is_file() and not (export / "adapters").exists()  # the ablated adapter left out
    assert (work / "published" / "ft" / "checkpoint").is_file() and (work / "report.html").is_file()
    assert (work / "runs" / "ft-no-pii-exact" / "deletion-certificate.json").is_file()
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["holdout"]["mode"] == "documents" and set(manifest["splits"]["val"]["class_counts"]) == {
        "acme/tickets", "acme/docs", "acme/customer-pii"}
