"""``smalti evaluate``: an evaluator measures a run and signs what it measured (issue 37, the evaluator's half).

Checked with third parties where they exist: the statement parses strictly with the in-toto attestation library,
the predicate against its published JSON Schema (jsonschema), and securesystemslib verifies the DSSE envelope
given only the evaluator's public key. lm-eval's accuracy equals a hand computation over the same items.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, smalti_cli, tiny_recipe, write_recipe
from helpers import latest_payload

pytest.importorskip("lm_eval")
TASKS = REPO / "smalti" / "evaluation" / "tasks" / "shakespeare"


@pytest.fixture(scope="module")
def trained(evaluated_governance, tmp_path_factory) -> Path:
    g = evaluated_governance
    root = tmp_path_factory.mktemp("evaluated")
    data = {"corpus": None, "url": str(g.dataset), "taxonomy": str(g.taxonomy), "trust": str(g.trust),
            "cache_dir": str(root / "cache")}
    config = tiny_recipe(Path("unused"), data=data, train={"max_duration": "8ba"}, eval={"interval": "8ba"},
                         checkpoint={"interval": "4ba", "keep": 2}, governance={"ledger": {"enabled": True, "key": str(g.key("trainer"))}})
    recipe = write_recipe(root / "recipe.yaml", config)
    done = smalti_cli("train", str(recipe), "--run-dir", str(root / "run"))
    assert done.returncode == 0, done.stderr
    return root / "run"


def own_tasks(folder: Path, corpus: Path, items: int = 6) -> Path:
    """A team's own task folder: 'which play' over the tiny corpus's own lines, so its tokenizer reads them."""
    from smalti.evaluation.tasks.shakespeare.make_tasks import verse_lines  # type: ignore[import-not-found]

    folder.mkdir(parents=True, exist_ok=True)
    plays = ["hamlet", "macbeth", "tempest"]
    rows = []
    for index in range(items):
        work = plays[index % 3]
        line = verse_lines((corpus / f"{work}.txt").read_text(encoding="utf-8"))[index * 7]
        rows.append({"line": line, "choices": plays, "answer": plays.index(work)})
    (folder / "plays.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load((TASKS / "which_play.yaml").read_text())
    spec.update(task="tiny_which_play", dataset_kwargs={"data_files": {"test": "plays.jsonl"}})
    (folder / "plays.yaml").write_text(yaml.safe_dump(spec))
    return folder


def test_the_bundled_tasks_are_what_their_script_makes_from_the_corpus(tmp_path):
    from smalti.evaluation.tasks.shakespeare.make_tasks import make  # type: ignore[import-not-found]

    make(REPO / "data" / "shakespeare", tmp_path)
    for name in ("which_play.jsonl", "next_line.jsonl"):
        assert (tmp_path / name).read_bytes() == (TASKS / name).read_bytes(), name
    items = [json.loads(line) for line in (TASKS / "which_play.jsonl").read_text().splitlines()]
    assert len(items) > 100 and all(len(i["choices"]) == 4 and 0 <= i["answer"] < 4 for i in items)


def test_an_evaluation_is_a_signed_in_toto_statement_third_parties_check(trained, evaluated_governance, tmp_path,
                                                                         tiny_corpus):
    import jsonschema
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from google.protobuf import json_format
    from in_toto_attestation.v1.statement import Statement
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    g = evaluated_governance
    tasks = own_tasks(tmp_path / "tasks", tiny_corpus)
    done = smalti_cli("evaluate", str(trained), "--key", str(g.key("evaluator")), "--tasks", str(tasks))
    assert done.returncode == 0, done.stderr
    assert "evaluated" in done.stdout and "as lab-evals" in done.stdout and "tiny_which_play" in done.stdout
    attestation = trained / "evaluations" / f"lab-evals-{latest_payload_name(trained)}.intoto.json"
    assert f"signed attestation: {attestation}" in done.stdout

    raw = base64.b64decode((g.keys / "evaluator.pub").read_text().split("ed25519:")[1].strip())
    key = SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(raw), keyid=hashlib.sha256(raw).hexdigest()[:16])
    envelope = Envelope.from_dict(json.loads(attestation.read_text()))
    envelope.verify([key], 1)
    statement = json.loads(envelope.payload)
    parsed = json_format.ParseDict({k: v for k, v in statement.items() if k != "_type"} | {"type": statement["_type"]},
                                   Statement([], "", {}).pb)
    Statement.copy_from_pb(parsed).validate()
    schema = json.loads((REPO / "smalti" / "evaluation" / "evaluation-predicate.schema.json").read_text())
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(statement["predicate"])
    assert statement["predicateType"] == "https://smalti.dev/attestation/evaluation/v1"

    checkpoint = sorted((trained / "checkpoints").glob("ep*-ba*.pt"))[-1]
    assert statement["subject"] == [{"name": f"checkpoints/{checkpoint.name}",
                                     "digest": {"sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest()}}]
    predicate = statement["predicate"]
    assert predicate["model"]["ledger"]["checkpoint"] == smalti_cli("ledger", "checkpoint", str(trained)).stdout
    assert predicate["evaluator"] == {"name": "lab-evals", "key_id": hashlib.sha256(raw).hexdigest()[:16]}
    from smalti.checkpoint import weights_sha256

    assert predicate["model"]["weights_sha256"] == weights_sha256(latest_payload(trained)["model"])
    # the held-out losses are the trainer's own evaluation of the same checkpoint, to the digit
    assert predicate["held_out"]["losses_by_class"] == latest_payload(trained)["eval_by_class"]
    task = predicate["tasks"][0]
    assert task["definition"] == {"name": "plays.yaml", "sha256": hashlib.sha256((tasks / "plays.yaml").read_bytes()).hexdigest()}
    assert task["data"] == [{"name": "plays.jsonl", "sha256": hashlib.sha256((tasks / "plays.jsonl").read_bytes()).hexdigest()}]
    assert task["metrics"]["items"] == 6 and 0.0 <= task["metrics"]["acc"] <= 1.0

    # broken on purpose: another key does not verify it
    other = (g.keys / "trainer.pub").read_text().split("ed25519:")[1].strip()
    other_raw = base64.b64decode(other)
    from securesystemslib.exceptions import VerificationError

    with pytest.raises(VerificationError):
        envelope.verify([SSlibKey.from_crypto(Ed25519PublicKey.from_public_bytes(other_raw),
                                              keyid=hashlib.sha256(raw).hexdigest()[:16])], 1)


def latest_payload_name(run: Path) -> str:
    return sorted((run / "checkpoints").glob("ep*-ba*.pt"))[-1].stem


def test_lm_eval_s_accuracy_equals_a_hand_computation(trained, tmp_path, tiny_corpus):
    from smalti.evaluation.harness import SmaltiLM, read_task_folder, run_tasks
    from smalti.generation import load_trained_model

    tasks = read_task_folder(own_tasks(tmp_path / "tasks", tiny_corpus))
    model, tokenizer, _ = load_trained_model(trained)
    results = run_tasks(model, tokenizer, tasks)["tiny_which_play"]
    scorer = SmaltiLM(model, tokenizer)
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "plays.jsonl").read_text().splitlines()]
    right = right_norm = 0
    for row in rows:
        context = f"{row['line']}\nThis is from"
        scores = [scorer.score(context, " " + choice)[0] for choice in row["choices"]]
        right += int(max(range(3), key=scores.__getitem__) == row["answer"])
        normed = [s / len(" " + c) for s, c in zip(scores, row["choices"])]
        right_norm += int(max(range(3), key=normed.__getitem__) == row["answer"])
    assert results["items"] == len(rows)
    assert results["acc"] == right / len(rows) and results["acc_norm"] == right_norm / len(rows)
    # and the scorer against the model's own cross-entropy, for an item short enough for one window
    import torch.nn.functional as F

    head, tail = list(tokenizer.encode("Ham")), list(tokenizer.encode("let is"))
    with torch.no_grad():
        logits = model(torch.tensor(head + tail)[None, :-1])[0, -len(tail):]
    expected = -F.cross_entropy(logits.float(), torch.tensor(tail), reduction="sum")
    assert abs(scorer.score("Ham", "let is")[0] - float(expected)) < 1e-4


def test_what_cannot_be_evaluated_is_refused_in_one_line(trained, evaluated_governance, tmp_path, tiny_corpus):
    g = evaluated_governance
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "a.yaml").write_text("task: a\ndataset_path: json\nprocess_docs: !function utils.process\n")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "b.yaml").write_text("task: b\ndataset_path: openai/gsm8k\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "c.yaml").write_text("task: c\ndataset_path: json\ndataset_kwargs: {data_files: {test: ../x.jsonl}}\n")
    (tmp_path / "x.jsonl").write_text("{}\n")
    cases = [
        (["--key", str(g.key("trainer"))], "is not an evaluator of taxonomy 'tiny'"),
        (["--key", str(g.key("evaluator")), "--tasks", str(evil)], "a tag such as !function would run code"),
        (["--key", str(g.key("evaluator")), "--tasks", str(hub)], "dataset_path 'openai/gsm8k' would load from the"),
        (["--key", str(g.key("evaluator")), "--tasks", str(outside)], "data file '../x.jsonl' is outside the task"),
        (["--key", str(g.key("evaluator")), "--limit", "0"], "--limit must be at least 1"),
    ]
    for extra, message in cases:
        done = smalti_cli("evaluate", str(trained), *extra)
        assert done.returncode != 0 and message in done.stderr, (extra, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_checkpoint_that_is_not_what_the_final_head_signs_is_not_evaluated(trained, evaluated_governance, tmp_path):
    """The run's latest checkpoint pointer moved back to an earlier checkpoint: its weights are not the ones the
    ledger's final signed head names, so an evaluation of it would be tied to the wrong history."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("evaluations"))
    (copy / "checkpoints" / "latest").write_text("ep0-ba4.pt")
    done = smalti_cli("evaluate", str(copy), "--key", str(evaluated_governance.key("evaluator")), "--no-tasks")
    assert done.returncode != 0 and "are not the ones the ledger's final signed head names" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (copy / "evaluations").exists()


def test_a_run_whose_ledger_was_tampered_with_is_not_evaluated(trained, evaluated_governance, tmp_path):
    import shutil
    import sqlite3

    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("evaluations"))
    with sqlite3.connect(copy / "ledger.sqlite") as db:  # one byte of one entry, as test_deletion flips it
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
        db.execute("UPDATE entries SET data = ? WHERE idx = 2", (data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],))
    done = smalti_cli("evaluate", str(copy), "--key", str(evaluated_governance.key("evaluator")), "--no-tasks")
    assert done.returncode != 0 and "its ledger does not verify" in done.stderr, done.stderr
    assert not (copy / "evaluations").exists()


def test_the_bundled_tasks_run_on_a_model_of_the_whole_corpus_and_a_run_without_taxonomy_names_its_evaluator(
    governed, tmp_path
):
    """The default tasks, on a character model of every play (its vocabulary reads them); the run has a ledger but
    no taxonomy, so the evaluator names itself and the trainer key is given."""
    config = tiny_recipe(REPO / "data" / "shakespeare", train={"max_duration": "2ba"}, eval={"interval": "2ba"},
                         checkpoint={"interval": "2ba"},
                         governance={"ledger": {"enabled": True, "key": str(governed.key("trainer"))}})
    recipe = write_recipe(tmp_path / "recipe.yaml", config)
    assert smalti_cli("train", str(recipe), "--run-dir", str(tmp_path / "run")).returncode == 0
    args = ["evaluate", str(tmp_path / "run"), "--key", str(governed.key("model-risk")), "--limit", "3",
            "--trainer-pubkey", str(governed.keys / "trainer.pub"), "--no-held-out", "--json"]
    unnamed = smalti_cli(*args)
    assert unnamed.returncode != 0 and "has no taxonomy to name its evaluators: give --name" in unnamed.stderr
    done = smalti_cli(*args, "--name", "independent-lab")
    assert done.returncode == 0, done.stderr
    predicate = json.loads(done.stdout)["predicate"]
    assert predicate["evaluator"]["name"] == "independent-lab" and predicate["held_out"] is None
    assert [t["name"] for t in predicate["tasks"]] == ["shakespeare_next_line", "shakespeare_which_play"]
    assert all(t["metrics"]["items"] == 3 for t in predicate["tasks"])
    assert (tmp_path / "run" / "evaluations" / "independent-lab-ep0-ba2.intoto.json").is_file()


def test_data_governance_names_an_evaluator_in_the_taxonomy(governed, tmp_path):
    from smalti.trust.taxonomy import Taxonomy

    base = ["taxonomy", "init", str(tmp_path / "t.yaml"), "--name", "t", "--class", "a/b",
            "--data-governance", str(governed.keys / "data-governance.pub")]
    done = smalti_cli(*base, "--evaluator", f"lab-evals={governed.keys / 'trainer.pub'}")
    assert done.returncode == 0, done.stderr
    taxonomy = Taxonomy.parse((tmp_path / "t.yaml").read_bytes(), "t.yaml")
    assert taxonomy.authorities["lab-evals"].role == "evaluator"
    bad = smalti_cli(*base, "--force", "--evaluator", "lab-evals")
    assert bad.returncode != 0 and "--evaluator 'lab-evals': expected NAME=PUB" in bad.stderr


def test_a_signed_export_carries_the_evaluations_of_its_checkpoint_and_only_those(evaluated_governance, tmp_path):
    from test_hf_models import hf_model

    from smalti.evaluation.attestation import evaluation_statement
    from smalti.trust.keys import SigningKey
    from smalti.workflows.provenance import sign_envelope

    g = evaluated_governance
    data = {"corpus": None, "url": str(g.dataset), "taxonomy": str(g.taxonomy), "trust": str(g.trust),
            "cache_dir": str(tmp_path / "cache")}
    config = tiny_recipe(Path("unused"), model=hf_model(), data=data, train={"max_duration": "4ba"},
                         eval={"interval": "4ba"}, checkpoint={"interval": "4ba"},
                         governance={"ledger": {"enabled": True, "key": str(g.key("trainer"))}})
    run = tmp_path / "run"
    assert smalti_cli("train", str(write_recipe(tmp_path / "r.yaml", config)), "--run-dir", str(run)).returncode == 0
    done = smalti_cli("evaluate", str(run), "--key", str(g.key("evaluator")), "--no-tasks")
    assert done.returncode == 0, done.stderr
    # a hostile run folder: an "evaluation" the trainer signed itself, and junk
    forged = evaluation_statement([], {"evaluator": {"name": "lab-evals"}, "model": {"checkpoint": "ep0-ba4.pt"}})
    (run / "evaluations" / "forged.intoto.json").write_text(
        json.dumps(sign_envelope(forged, SigningKey.load(g.key("trainer")))))
    (run / "evaluations" / "junk.intoto.json").write_text("not json")
    assert smalti_cli("keys", "new", "trainer-model", "--dir", str(tmp_path / "keys"), "--type",
                      "ecdsa-p256").returncode == 0
    model = tmp_path / "model"
    exported = smalti_cli("export", str(run), "--out", str(model), "--sign", "--model-key",
                          str(tmp_path / "keys" / "trainer-model.key"))
    assert exported.returncode == 0, exported.stderr
    assert "evaluation lab-evals-ep0-ba4.intoto.json" in exported.stdout
    assert sorted(p.name for p in (model / "evaluations").iterdir()) == ["lab-evals-ep0-ba4.intoto.json"]
    envelope = json.loads((model / "provenance.intoto.json").read_text())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert "evaluations/lab-evals-ep0-ba4.intoto.json" in {s["name"] for s in statement["subject"]}
    assert "evaluation lab-evals-ep0-ba4.intoto.json" in {
        b["name"] for b in statement["predicate"]["runDetails"]["byproducts"]}
    verify = ["verify-model", str(model), "--trainer-pubkey", str(g.keys / "trainer.pub"), "--model-pubkey",
              str(tmp_path / "keys" / "trainer-model.pub")]
    assert smalti_cli(*verify).returncode == 0
    carried = model / "evaluations" / "lab-evals-ep0-ba4.intoto.json"
    carried.write_text(carried.read_text().replace('"payload": "', '"payload": "A', 1))
    assert smalti_cli(*verify).returncode != 0, "a changed evaluation breaks the model's signature"


def test_the_audit_service_serves_a_run_s_evaluations_checked_against_its_own_taxonomy(
    trained, evaluated_governance, tmp_path
):
    """Only an evaluator the service's taxonomy names verifies: an attestation the trainer signed itself, junk, and
    a link out of the folder are listed as not verified, with why."""
    import shutil

    from serve_helpers import Client, make_audit_taxonomy, serving
    from smalti.evaluation.attestation import evaluation_statement
    from smalti.trust.keys import SigningKey
    from smalti.workflows.provenance import sign_envelope

    g = evaluated_governance
    done = smalti_cli("evaluate", str(trained), "--key", str(g.key("evaluator")), "--no-tasks")
    assert done.returncode == 0, done.stderr
    runs = tmp_path / "runs"
    shutil.copytree(trained, runs / "alpha")
    folder = runs / "alpha" / "evaluations"
    forged = evaluation_statement([], {"evaluator": {"name": "lab-evals"}})
    (folder / "forged.intoto.json").write_text(json.dumps(sign_envelope(forged, SigningKey.load(g.key("trainer")))))
    (folder / "junk.intoto.json").write_text("{")
    (tmp_path / "secret.intoto.json").write_text("{}")
    (folder / "link.intoto.json").symlink_to(tmp_path / "secret.intoto.json")
    taxonomy = make_audit_taxonomy(g, tmp_path, evaluators={"lab-evals": g.keys / "evaluator.pub"})
    with serving(runs, taxonomy, g.trust) as (base, _):
        answer = Client(base, tmp_path / "keys" / "auditor.key").get("/api/runs/alpha/evaluations")
    assert answer.status_code == 200, answer.text
    listed = {e["name"]: e for e in answer.json()}
    good = listed[f"lab-evals-{latest_payload_name(trained)}.intoto.json"]
    assert good["verified"] and good["evaluator"] == "lab-evals"
    assert good["statement"]["predicate"]["held_out"]["losses_by_class"] == latest_payload(trained)["eval_by_class"]
    assert not listed["forged.intoto.json"]["verified"]
    assert "not signed by any evaluator the taxonomy names" in listed["forged.intoto.json"]["problem"]
    assert not listed["junk.intoto.json"]["verified"] and not listed["link.intoto.json"]["verified"]
    assert listed["link.intoto.json"]["problem"] == "not a regular file"


def test_the_audit_report_shows_the_evaluations_and_escapes_a_hostile_name(trained, evaluated_governance, tmp_path):
    import shutil

    g = evaluated_governance
    run = tmp_path / "run"
    shutil.copytree(trained, run, ignore=shutil.ignore_patterns("evaluations"))
    done = smalti_cli("evaluate", str(run), "--key", str(g.key("evaluator")), "--tasks", str(TASKS), "--limit", "2",
                      "--no-held-out")
    if done.returncode != 0:  # the tiny corpus's characters may not cover the bundled tasks: held-out only then
        assert "is not in the vocabulary" in done.stderr, done.stderr
        done = smalti_cli("evaluate", str(run), "--key", str(g.key("evaluator")), "--no-tasks")
    assert done.returncode == 0, done.stderr
    (run / "evaluations" / "<img src=x onerror=alert(1)>.intoto.json").write_text("{}")
    report = tmp_path / "report.html"
    shown = smalti_cli("audit", str(run), "--report", str(report), "--pubkey", str(g.keys / "trainer.pub"))
    assert shown.returncode == 0, shown.stderr
    page = report.read_text()
    assert "<h2>Evaluations</h2>" in page and "lab-evals (verified), of ep0-ba8.pt" in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.intoto.json" in page
    assert "NOT VERIFIED" in page
