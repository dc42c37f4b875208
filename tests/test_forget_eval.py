"""`smalti eval-forget` (issue 24, part 1): the unlearning literature's measurements of one deletion, on a parent, an
exact forget (its own counterfactual) and a 'deletion' that removed nothing."""

from __future__ import annotations

import json

import numpy as np

from conftest import smalti_cli
from test_deletion import parent  # noqa: F401 (the module's trained parent, TEMPEST late in the run)
from test_ledger import TEMPEST


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
    from smalti.governance.forget_eval import membership_auc

    rng = np.random.default_rng(3)
    members, others = rng.normal(1.0, 0.3, 200), rng.normal(1.5, 0.3, 150)
    assert abs(membership_auc(members, others) - _mann_whitney_auc(members, others)) < 1e-12
    assert membership_auc(members, others) > 0.8  # lower loss on members: the attack finds them
    assert abs(membership_auc(others, others) - 0.5) < 1e-12
