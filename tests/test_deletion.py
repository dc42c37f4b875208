"""Deletion (G5, G6): exact forgetting equals the counterfactual bit for bit; ablation touches only what it says."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch

from conftest import smalti_cli, write_policy
from helpers import assert_tree_equal, latest_payload, recipe
from test_ledger import HAMLET, TEMPEST, entries, ledger_recipe, train

SONNETS = "gutenberg/poetry/sonnets"


def first_late_batch(config: dict) -> int:
    from smalti.build import build_data
    from smalti.distributed import DistInfo

    data = build_data(recipe(config), DistInfo())
    try:
        return data.first_late_batch()
    finally:
        data.train.close(), data.val.close()


def late_config(governed, train: dict | None = None, **data):
    """TEMPEST placed last in the epoch, so it first appears mid-training; deterministic CPU training.

    A batch of 32 reaches the late class in a quarter of the steps (and checkpoints) a batch of 8 takes; ``train``
    overrides reach the probe too."""
    train = {"global_batch_size": 32, **(train or {})}
    probe = ledger_recipe(governed, data={"batching": "random", "late_classes": [TEMPEST], **data}, train=train)
    late = first_late_batch(probe)
    assert late > 4
    return ledger_recipe(governed, data={"batching": "random", "late_classes": [TEMPEST], **data},
                         train={**train, "max_duration": f"{late + 5}ba", "deterministic": True},
                         checkpoint={"interval": "4ba", "keep": 1}), late


def assert_exact_forget_is_the_counterfactual(governed, tmp_path: Path, config: dict, changed: str) -> None:
    """Train ``config`` (from ``late_config``), forget TEMPEST exactly, train the counterfactual without it:
    weights and optimizer state bitwise equal, and ``changed`` differs from the parent's (TEMPEST taught it)."""
    from smalti.trust.keys import SigningKey
    from smalti.workflows.forget import forget

    parent = _train_config(config, tmp_path / "parent")
    forget(parent, TEMPEST, tmp_path / "forgot", SigningKey.load(governed.key("trainer")))
    counterfactual = _train_config({**config, "data": {**config["data"], "exclude_classes": [TEMPEST]}},
                                   tmp_path / "counterfactual")
    forgot, reference = latest_payload(tmp_path / "forgot"), latest_payload(counterfactual)
    assert_tree_equal(forgot["model"], reference["model"], "forgotten vs counterfactual")
    assert_tree_equal(forgot["optimizer"], reference["optimizer"], f"{config['optimizer']['name']} state")
    assert not torch.equal(forgot["model"][changed], latest_payload(parent)["model"][changed])


def _train_config(config: dict, run_dir: Path) -> Path:
    from smalti.trainer import Trainer

    with Trainer(recipe(config), run_dir) as trainer:
        trainer.fit()
    return run_dir


@pytest.fixture(scope="module")
def parent(governed, tmp_path_factory):
    root = tmp_path_factory.mktemp("deletion")
    config, late = late_config(governed)
    return _train_config(config, root / "parent"), config, late


def test_exact_forget_equals_the_counterfactual_run_bitwise(parent, tmp_path):
    run, config, late = parent
    plan = smalti_cli("forget", str(run), "--class", TEMPEST, "--dry-run", "--json")
    assert plan.returncode == 0, plan.stderr
    described = json.loads(plan.stdout)
    assert described["first_step"] == late + 1 and described["fork_step"] == late
    assert described["steps_to_replay"] == 5 and described["fork_checkpoint"] == f"ep0-ba{late}.pt"
    assert described["ablation"].startswith("not possible")

    out = tmp_path / "forgot"
    done = smalti_cli("forget", str(run), "--class", TEMPEST, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "steps replayed: 5" in done.stdout

    counterfactual = _train_config({**config, "data": {**config["data"], "exclude_classes": [TEMPEST]}},
                                   tmp_path / "counterfactual")
    assert_tree_equal(latest_payload(out)["model"], latest_payload(counterfactual)["model"], "forgotten vs counterfactual")
    assert not torch.equal(latest_payload(out)["model"]["tok_emb.weight"], latest_payload(run)["model"]["tok_emb.weight"])

    forgotten, reference = entries(out), entries(counterfactual)
    assert forgotten[0]["parent"]["fork_step"] == late and forgotten[0]["parent"]["head"]["size"] == late + 1
    assert [e["step"] for e in forgotten[1:]] == list(range(late + 1, late + 6))
    after_fork = [e for e in reference[1:] if e["step"] > late]
    assert forgotten[1:] == after_fork  # the ledger after the fork is the counterfactual's, field for field
    assert all(TEMPEST not in e["counts"] for e in forgotten[1:])
    assert any(TEMPEST in e["counts"] for e in entries(run)[1:])

    verified = smalti_cli("ledger", "verify", str(out))
    assert verified.returncode == 0, verified.stderr
    certificate = json.loads((out / "deletion-certificate.json").read_text())
    assert certificate["mode"] == "exact" and certificate["steps_replayed"] == 5
    before, after = certificate["evaluation"]["before"], certificate["evaluation"]["after"]
    assert set(before) == set(after) and TEMPEST in after
    # Read, not recomputed: the trainer's own final evaluations of the parent and of the replay.
    assert certificate["evaluation"]["source"] == "recorded by the trainer at its final evaluation"
    assert before == latest_payload(run)["eval_by_class"] and after == latest_payload(out)["eval_by_class"]
    assert after == latest_payload(counterfactual)["eval_by_class"] and after[TEMPEST] != before[TEMPEST]
    evaluated = smalti_cli("eval", str(counterfactual), "--by-class", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["by_class"][TEMPEST] == after[TEMPEST]  # same weights, same loss

    # The forked run's audit report carries its certificate, checked, and the software that made both.
    from smalti.software import software

    assert certificate["software"] == software()
    report = smalti_cli("audit", str(out), "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Deletion certificate</h2>" in page and "CERTIFICATE VERIFIED" in page
    assert f"<code>{TEMPEST}</code>" in page and "5 of " in page
    (out / "deletion-certificate.json").write_text(json.dumps({**certificate, "steps_replayed": 4}))
    assert smalti_cli("audit", str(out), "--report", str(tmp_path / "bad.html")).returncode == 0
    assert "CERTIFICATE FAILED" in (tmp_path / "bad.html").read_text()


def test_a_class_that_never_contributed_is_a_noop_with_a_certificate(parent, tmp_path):
    run, _, _ = parent
    assert smalti_cli("forget", str(run), "--class", "gutenberg/history", "--dry-run").stdout.find("no-op") >= 0
    out = tmp_path / "noop"
    done = smalti_cli("forget", str(run), "--class", "gutenberg/history", "--out", str(out), "--eval-samples", "7")
    assert done.returncode == 0, done.stderr
    certificate = json.loads((out / "deletion-certificate.json").read_text())
    assert certificate["mode"] == "noop" and certificate["steps_replayed"] == 0 and "never contributed" in certificate["note"]
    evaluation = certificate["evaluation"]  # another sample count than training's: evaluated anew, on 7 examples
    assert evaluation["source"] == "evaluated by smalti forget" and evaluation["max_samples"] == 7
    seven = json.loads(smalti_cli("eval", str(run), "--by-class", "--json", "--max-samples", "7").stdout)["by_class"]
    assert evaluation["before"] == evaluation["after"] == seven != latest_payload(run)["eval_by_class"]
    assert smalti_cli("ledger", "verify", str(out)).returncode == 0


def test_a_class_present_from_the_start_replays_from_the_initial_weights(parent):
    run, _, late = parent
    plan = json.loads(smalti_cli("forget", str(run), "--class", HAMLET, "--dry-run", "--json").stdout)
    assert plan["fork_step"] == 0 and plan["fork_checkpoint"] is None
    assert plan["steps_to_replay"] == plan["total_steps"] == late + 5
    text = smalti_cli("forget", str(run), "--class", HAMLET, "--dry-run").stdout
    assert "the initial weights" in text and "100% of a full retrain" in text


def test_tampered_parent_ledger_or_certificate_fails_verification(parent, tmp_path):
    import shutil

    run, _, _ = parent
    copy = tmp_path / "parent"
    shutil.copytree(run, copy)
    out = tmp_path / "noop"
    assert smalti_cli("forget", str(copy), "--class", "gutenberg/history", "--out", str(out)).returncode == 0
    path = out / "deletion-certificate.json"
    original = path.read_text()

    certificate = json.loads(original)
    certificate["evaluation"]["after"][TEMPEST] = 0.0
    path.write_text(json.dumps(certificate))
    failed = smalti_cli("ledger", "verify", str(out))
    assert failed.returncode == 1 and "signature does not verify" in failed.stderr

    path.write_text(original)
    assert smalti_cli("ledger", "verify", str(out)).returncode == 0
    with sqlite3.connect(copy / "ledger.sqlite") as db:  # one byte of the parent's third entry
        (data,) = db.execute("SELECT data FROM entries WHERE idx = 2").fetchone()
        db.execute("UPDATE entries SET data = ? WHERE idx = 2", (data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],))
    failed = smalti_cli("ledger", "verify", str(out))
    assert failed.returncode == 1 and "parent ledger" in failed.stderr
    refused = smalti_cli("forget", str(copy), "--class", TEMPEST, "--dry-run")
    assert refused.returncode != 0 and "does not verify" in refused.stderr


def test_ablation_resets_only_the_confined_parameters(governed, tmp_path):
    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    run = train(governed, tmp_path / "run", governance={"policy": str(policy)},
                model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                train={"max_duration": "6ba", "microbatch_size": 2}, data={"batching": "per_class"})
    refused = smalti_cli("forget", str(run), "--class", TEMPEST, "--mode", "ablate", "--out", str(tmp_path / "no"))
    assert refused.returncode != 0 and "no exclusive rule" in refused.stderr and "use --mode exact" in refused.stderr
    assert not (tmp_path / "no").exists() or not any((tmp_path / "no").iterdir())

    for reset in ("initial", "zero"):
        out = tmp_path / f"ablated-{reset}"
        done = smalti_cli("forget", str(run), "--class", HAMLET, "--mode", "ablate", "--reset", reset, "--out", str(out))
        assert done.returncode == 0, done.stderr
        before, after = latest_payload(run)["model"], latest_payload(out)["model"]
        certificate = json.loads((out / "deletion-certificate.json").read_text())
        confined = set(certificate["reset"]["parameters"])
        assert confined and all("adapter" in name for name in confined)
        assert certificate["evidence"]["other_classes_in_confined_layers"] == []
        assert "forward pass" in certificate["limits"]
        evaluation = certificate["evaluation"]  # the parent's recorded losses are not the ablated weights'
        assert evaluation["source"] == "evaluated by smalti forget" and evaluation["after"][HAMLET] != (
            evaluation["before"][HAMLET])
        assert latest_payload(out)["evaluated_at"] == -1 and latest_payload(out)["eval_by_class"] == {}
        from smalti.build import build_model
        from smalti.determinism import seed_everything

        for name, value in after.items():
            if name not in confined:
                assert torch.equal(value, before[name]), name  # every other parameter bitwise unchanged
            elif reset == "zero":
                assert torch.count_nonzero(value) == 0, name
            else:
                assert not torch.equal(value, before[name]) or torch.count_nonzero(before[name]) == 0, name
        if reset == "initial":  # the values a fresh model of the same recipe starts from
            from smalti.build import build_data
            from smalti.distributed import DistInfo

            config = recipe(ledger_recipe(governed, governance={"policy": str(policy)},
                                          model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                                          train={"max_duration": "6ba", "microbatch_size": 2},
                                          data={"batching": "per_class"}))
            seed_everything(config.seed)
            data = build_data(config, DistInfo())
            initial = build_model(config, data.tokenizer.vocab_size, data.class_names).state_dict()
            data.train.close(), data.val.close()
            for name in confined:
                assert torch.equal(after[name], initial[name]), name
        # Adam's moments: the confined parameters' are zero, every other one's the parent's. The index of each
        # parameter is read from a real optimizer's groups (decayed matrices first, not the state dict order).
        from smalti.build import build_data as _data
        from smalti.distributed import DistInfo as _Dist
        from smalti.optimizers import build_optimizer

        config = recipe(ledger_recipe(governed, governance={"policy": str(policy)},
                                      model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                                      train={"max_duration": "6ba", "microbatch_size": 2}, data={"batching": "per_class"}))
        data = _data(config, _Dist())
        fresh = build_model(config, data.tokenizer.vocab_size, data.class_names)
        data.train.close(), data.val.close()
        name_of = {id(p): n for n, p in fresh.named_parameters()}
        order = [name_of[id(p)] for group in build_optimizer(fresh, config.optimizer).param_groups for p in group["params"]]
        moments_before, moments_after = latest_payload(run)["optimizer"]["state"], latest_payload(out)["optimizer"]["state"]
        for index, name in enumerate(order):
            for moment in ("exp_avg", "exp_avg_sq"):
                if name in confined:
                    assert torch.count_nonzero(moments_after[index][moment]) == 0, name
                    assert torch.count_nonzero(moments_before[index][moment]) > 0, name  # there was something to reset
                else:
                    assert torch.equal(moments_after[index][moment], moments_before[index][moment]), name
        verified = smalti_cli("ledger", "verify", str(out))
        assert verified.returncode == 0, verified.stderr


def test_deletable_classes_of_the_taxonomy_go_last(tmp_path, tiny_corpus):
    from conftest import make_governance
    from smalti.build import build_data
    from smalti.distributed import DistInfo
    from smalti.errors import RecipeError
    from test_ledger import HAMLET

    marked = make_governance(tmp_path / "gov", tiny_corpus, deletable=(HAMLET,))

    def data(**options):
        return build_data(recipe(marked.recipe(data={"batching": "random", **options})), DistInfo())

    by_taxonomy, by_name, plain = data(deletable_late=True), data(late_classes=[HAMLET]), data()
    assert by_taxonomy.first_late_batch() == by_name.first_late_batch() and by_taxonomy.first_late_batch() > 0
    assert torch.equal(by_taxonomy.sampler.global_batch(0, 0), by_name.sampler.global_batch(0, 0))
    assert plain.first_late_batch() is None
    hamlet = by_taxonomy.class_names.index(HAMLET)
    first = by_taxonomy.first_late_batch()
    early = torch.cat([by_taxonomy.sampler.global_batch(0, b) for b in range(first)])
    assert not (by_taxonomy.train.classes[early] == hamlet).any()
    with pytest.raises(RecipeError, match="deletable_late"):
        build_data(recipe(tiny_recipe_for_corpus(tiny_corpus, deletable_late=True)), DistInfo())


def tiny_recipe_for_corpus(corpus, **data):
    from conftest import tiny_recipe

    return tiny_recipe(corpus, data={"corpus": str(corpus), **data})
