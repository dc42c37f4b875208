"""`smalti eval-forget` (issue 24, part 1): the unlearning literature's measurements of one deletion, on a parent, an
exact forget (its own counterfactual) and a 'deletion' that removed nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import smalti_cli, write_policy
from helpers import latest_payload
from test_deletion import parent  # noqa: F401 (the module's trained parent, TEMPEST late in the run)
from test_ledger import HAMLET, TEMPEST, entries, train


def _mann_whitney_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(a member's loss < a non-member's), ties half: the AUC computed from its definition."""
    wins = (members[:, None] < others[None, :]).sum() + 0.5 * (members[:, None] == others[None, :]).sum()
    return float(wins / (len(members) * len(others)))


def test_eval_forget_reads_an_exact_forget_as_the_counterfactual_and_a_fake_one_as_the_parent(parent, tmp_path):  # noqa: F811
    run, _, _ = parent
    forgot = tmp_path / "forgot"
    assert smalti_cli("forget", str(run), "--class", TEMPEST, "--out", str(forgot)).returncode == 0
    args = ("--relearn-examples", "4,8", "--relearn-steps", "4", "--max-examples", "48")
    done = smalti_cli("eval-forget", str(run), str(forgot), "--class", TEMPEST, *args, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    quality = result["forget_quality"]
    assert quality["ks_statistic"] == 0 and quality["ks_p_value"] == 1.0  # the same weights: the same losses
    assert quality["loss_on_class"]["forgotten"] > quality["loss_on_class"]["parent"]
    mia = result["membership_inference_auc"]
    assert mia["forgotten"] == mia["counterfactual"]
    curves = {(r["model"], r["examples"]): r["curve"] for r in result["relearning"]["runs"]}
    assert curves[("forgotten", 8)] == curves[("counterfactual", 8)] and len(curves[("forgotten", 8)]) == 5
    assert (forgot / "forget-eval" / "relearning.png").stat().st_size > 1000
    assert json.loads((forgot / "forget-eval" / "forget-eval.json").read_text())["class"] == TEMPEST
    report = tmp_path / "report.html"
    assert smalti_cli("audit", str(forgot), "--report", str(report)).returncode == 0
    page = report.read_text()
    assert "How much was forgotten" in page and 'src="data:image/png;base64,' in page

    # A "deletion" that removed nothing (the parent itself) reads as the parent: distinguishable from the
    # counterfactual, already at the parent's loss before any relearning.
    fake = smalti_cli("eval-forget", str(run), str(run), "--class", TEMPEST, "--counterfactual", str(forgot), *args,
                      "--out", str(tmp_path / "fake"), "--json")
    assert fake.returncode == 0, fake.stderr
    faked = json.loads(fake.stdout)
    quality = faked["forget_quality"]
    assert quality["ks_statistic"] > 0 and quality["loss_on_class"]["forgotten"] == quality["loss_on_class"]["parent"]
    assert all(r["steps_to_parent_loss"] == 0 for r in faked["relearning"]["runs"] if r["model"] == "forgotten")
    refused = smalti_cli("eval-forget", str(run), str(run), "--class", TEMPEST, *args)
    assert refused.returncode != 0 and "pass --counterfactual" in refused.stderr


def test_the_membership_auc_is_the_attack_it_says(tmp_path):
    from smalti.workflows.forget_eval import membership_auc

    rng = np.random.default_rng(3)
    members, others = rng.normal(1.0, 0.3, 200), rng.normal(1.5, 0.3, 150)
    assert abs(membership_auc(members, others) - _mann_whitney_auc(members, others)) < 1e-12
    assert membership_auc(members, others) > 0.8  # lower loss on members: the attack finds them
    assert abs(membership_auc(others, others) - 0.5) < 1e-12


def test_the_ks_statistic_is_the_largest_gap_between_the_two_empirical_distributions():
    from scipy.stats import mannwhitneyu

    from smalti.workflows.forget_eval import ks_test, membership_auc

    rng = np.random.default_rng(5)
    forgotten, counterfactual = rng.normal(2.0, 0.4, 90), rng.normal(2.3, 0.5, 70)
    grid = np.sort(np.r_[forgotten, counterfactual])
    ecdf = lambda sample: np.searchsorted(np.sort(sample), grid, side="right") / len(sample)  # noqa: E731
    assert abs(ks_test(forgotten, counterfactual).statistic - np.abs(ecdf(forgotten) - ecdf(counterfactual)).max()) < 1e-12
    assert ks_test(forgotten, forgotten).statistic == 0 and ks_test(forgotten, forgotten).pvalue == 1.0
    assert ks_test(forgotten, counterfactual).pvalue < 0.01  # shifted by 0.3: told apart
    # The AUC against scipy's Mann-Whitney U: U / (n1 n2) with members scored by lower loss.
    u = mannwhitneyu(-forgotten, -counterfactual).statistic
    assert abs(membership_auc(forgotten, counterfactual) - u / (len(forgotten) * len(counterfactual))) < 1e-12


@pytest.fixture(scope="module")
def forgot(parent, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("relearn") / "forgot"
    assert smalti_cli("forget", str(parent[0]), "--class", TEMPEST, "--out", str(out)).returncode == 0
    return out


_ATTACK = """
import sys
from pathlib import Path
from smalti.workflows.forget_eval import RelearningBudget, relearn
relearn(Path(sys.argv[1]), sys.argv[2], 8, RelearningBudget(60, 1e-3, 16, checkpoint_every=10), Path(sys.argv[3]), 0.0)
"""


@pytest.mark.slow
def test_a_relearning_attack_is_a_smalti_run_that_resumes_exactly_after_kill_9(forgot, tmp_path):
    from smalti.workflows.forget_eval import RelearningBudget, relearn, relearning_run_dir

    budget = RelearningBudget(60, 1e-3, 16, checkpoint_every=10)
    whole, started = relearn(forgot, TEMPEST, 8, budget, tmp_path / "whole", 0.0)
    assert started is None
    run = relearning_run_dir(tmp_path / "whole", forgot, TEMPEST, 8, budget)
    assert len(whole) == 61 and min(whole[2:]) < whole[1]  # it relearns: the held-out loss falls (then overfits 8)
    assert entries(run)[0]["parent"]["run_dir"] == str(forgot.resolve())  # its ledger names the attacked model
    recipe = (run / "recipe.yaml").read_text()
    assert "only_classes:\n  - " + TEMPEST in recipe and "train_examples: 8" in recipe and "from_run: " in recipe

    # The same attack killed with SIGKILL after its first checkpoint, then run again: it resumes there.
    work = tmp_path / "killed"
    target = relearning_run_dir(work, forgot, TEMPEST, 8, budget) / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", _ATTACK, str(forgot), TEMPEST, str(work)],
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (target.is_dir() and any(p.suffix == ".pt" for p in target.iterdir())):
        assert child.poll() is None and time.monotonic() < deadline, "the attack ended before its first checkpoint"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    written = sorted(p.name for p in target.iterdir() if p.suffix == ".pt")
    assert written and written[-1] != "ep0-ba60.pt" and not any(p.name.endswith("ba60.pt") for p in target.iterdir()), \
        f"killed too late to test a resume: {written}"
    resumed, resumed_at = relearn(forgot, TEMPEST, 8, budget, work, 0.0)
    assert resumed_at == int(written[-1].split("ba")[1].split(".")[0]) < 60  # from the checkpoint before the kill
    assert resumed == whole  # every evaluated step, bitwise
    steps = [json.loads(line)["ba"] for line in (target.parent / "metrics.jsonl").read_text().splitlines()
             if "eval/loss" in json.loads(line)]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # no step logged twice
    a, b = latest_payload(run)["model"], latest_payload(target.parent)["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_relearning_run_trains_on_k_examples_of_the_class_only(forgot):
    from smalti.build import build_data
    from smalti.distributed import DistInfo
    from smalti.workflows.forget_eval import RelearningBudget, relearning_recipe

    config = relearning_recipe(forgot, TEMPEST, 8, RelearningBudget(5, 1e-3, 16))
    data = build_data(config, DistInfo())
    try:
        seen = torch.cat([torch.cat(list(data.batch_indices(epoch, 0))) for epoch in range(3)])
        assert len(seen.unique()) == 8 and data.shape.batches_per_epoch == 1  # k = 8 examples, batch min(8, k)
        assert {data.class_names[c] for c in data.train.classes[seen].tolist()} == {TEMPEST}
        held = data.eval_indices(16, [TEMPEST])
        assert len(held) == 16 and {data.class_names[c] for c in data.val.classes[held].tolist()} == {TEMPEST}
    finally:
        data.train.close(), data.val.close()
    assert config.governance.policy is None and config.eval.classes == [TEMPEST] and config.scheduler.name == "constant"


def test_an_ungated_slice_is_in_every_rows_forward_pass_and_still_only_its_class_updates_it(governed, tmp_path):
    """SGTM-like: model.adapters.gated false. The exclusive rule still keeps every other class's gradient out of
    Hamlet's slice (the ledger proves it, so ablation is allowed), but other classes' outputs now depend on it."""
    from smalti.build import build_data, build_model_for
    from smalti.config import load_recipe
    from smalti.distributed import DistInfo
    from smalti.models.adapters import set_row_classes

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    outputs = {}
    for gated in (True, False):
        run = train(governed, tmp_path / f"run-{gated}", governance={"policy": str(policy)},
                    model={"adapters": {"classes": [HAMLET], "hidden": 8, "gated": gated}},
                    train={"max_duration": "6ba", "microbatch_size": 2}, data={"batching": "per_class"})
        out = tmp_path / f"ablated-{gated}"
        done = smalti_cli("forget", str(run), "--class", HAMLET, "--mode", "ablate", "--out", str(out))
        assert done.returncode == 0, done.stderr
        config = load_recipe(run / "recipe.yaml")
        data = build_data(config, DistInfo())
        try:
            rows = (data.val.classes != data.class_names.index(HAMLET)).nonzero().squeeze(1)[:4]
            batch = data.val.gather(rows)
            for name, source in (("trained", run), ("ablated", out)):
                model = build_model_for(config, data)
                model.load_state_dict(latest_payload(source)["model"])
                model.eval()
                set_row_classes(model, batch.provenance)
                with torch.no_grad():
                    outputs[gated, name] = model(batch.inputs)
        finally:
            data.train.close(), data.val.close()
    # Gated: another class's rows never see Hamlet's adapter, so ablating it leaves their outputs bitwise alone.
    assert torch.equal(outputs[True, "trained"], outputs[True, "ablated"])
    # Ungated: the same rows ran through Hamlet's slice, so ablating it changes them.
    assert not torch.equal(outputs[False, "trained"], outputs[False, "ablated"])


def test_eval_forget_without_its_extra_says_so_in_one_line_before_any_work(tmp_path):
    """It used to fail with ModuleNotFoundError after 30 seconds of work when scipy was missing."""
    import subprocess
    import sys

    from conftest import REPO

    code = ("import sys; sys.modules['scipy'] = None; from smalti.cli.main import main; "
            f"sys.exit(main(['eval-forget', {str(tmp_path / 'parent')!r}, {str(tmp_path / 'forgot')!r}, '--class', 'x']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "needs the eval extra (scipy is not installed): pip install 'smalti[eval]'" in done.stderr
