"""A state-space language model (Mamba, from transformers, its PyTorch path on the CPU) under governance.

Mamba's mixer reads its children's weights directly (``dt_proj.weight`` in its own matrix product; with
kernels installed, every child's weight in one fused function), so its children cannot be split by rows: a
microbatch whose rows disagree about any parameter of a mixer runs one routing signature at a time. The
scan itself runs each row on its own, so nothing else is coupled. Proven here: G1 with mixed microbatches,
G4, G5 and G7 bitwise; and the router's net for a module of that kind it does not know (a gradient reaching a
split module that never ran stops the step).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smalti.distributed import DistInfo
from smalti.trainer import Trainer

from conftest import write_policy
from helpers import assert_tree_equal, assert_resume_is_bitwise, recipe
from test_moe import _mixed_last_step, _plain_and_perturbed

MAMBA = {"model_type": "mamba", "hidden_size": 32, "state_size": 4, "num_hidden_layers": 2, "expand": 2,
         "conv_kernel": 4}


def mamba(**extra) -> dict:
    return {"hf": {"config": {**MAMBA, **extra}}}


@pytest.mark.parametrize("denied", [["backbone.layers.0.mixer"], ["backbone.layers.1.mixer.dt_proj", "backbone.embeddings"]])
def test_g1_a_class_denied_a_mixer_leaves_it_and_its_state_untouched(governed, tmp_path, denied):
    steps = 2
    sections = dict(model=mamba(), data={"batching": "random"},
                    train={"max_duration": f"{steps}ba", "microbatch_size": 4})
    victim, classes, last = _mixed_last_step(governed, sections, steps)
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": [classes[victim]], "params": denied, "action": "deny"}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    probe = Trainer(config, tmp_path / "probe")
    forbidden = [n for n in probe.router.names if any(n.startswith(d + ".") for d in denied)]
    mixer = [n for n in probe.router.names if ".mixer." in n]
    assert all(probe.router._unsplittable[probe.router.names.index(n)] for n in mixer)  # never split by rows
    probe.close()
    (plain, a), (perturbed, b) = _plain_and_perturbed(config, tmp_path, victim, last, forbidden)
    for step, (x, y) in enumerate(zip(a, b)):
        assert_tree_equal(x[0], y[0], f"forbidden parameters after step {step}")
        assert_tree_equal(x[1], y[1], f"their AdamW state after step {step}")
    allowed = "backbone.layers.1.mixer.out_proj.weight"
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), "an allowed parameter must feel it"


def test_g4_the_ledger_of_a_mamba_run_equals_an_independent_replay(governed, tmp_path):
    from test_ledger import _replayed_cells, train

    run = train(governed, tmp_path / "run", model=mamba(), train={"max_duration": "4ba", "microbatch_size": 2},
                data={"batching": "random"}, checkpoint={"interval": "1ba", "keep": 100})
    assert _replayed_cells(run, "mixed") > 20  # no policy: every class may update every parameter


def test_g5_exact_forget_of_a_mamba_run_is_bitwise_the_counterfactual(governed, tmp_path):
    from test_deletion import assert_exact_forget_is_the_counterfactual, late_config

    config, _ = late_config(governed)
    config = dict(config, model={**config["model"], **mamba()})
    assert_exact_forget_is_the_counterfactual(governed, tmp_path, config, "backbone.layers.0.mixer.A_log")


def test_g7_a_crash_and_resume_of_a_mamba_run_is_bitwise_the_uninterrupted_run(governed, tmp_path):
    config = governed.recipe(model=mamba(), train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"},
                             governance={"ledger": {"enabled": True, "key": str(governed.key("trainer"))}})
    assert_resume_is_bitwise(tmp_path, config)


class ReadsItsChildDirectly(nn.Module):
    """A custom layer the router does not know: it multiplies by its child's weight without calling the child."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.child = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.linear(x, self.child.weight)


def test_a_split_module_whose_weight_another_module_reads_stops_the_step_instead_of_leaking(governed, tmp_path):
    """Fail closed: the router splits ``child`` by rows, but ``child`` never runs; a gradient arriving for its
    weight from the mixed microbatch stops the backward pass with one line naming it."""
    from smalti.build import build_data
    from smalti.governance.routing import RoutingError, Router
    from smalti.trust.policy import Policy, Rule

    config = recipe(governed.recipe(data={"batching": "random"}, train={"microbatch_size": 4}))
    data = build_data(config, DistInfo())
    batch = data.train.gather(data.sampler.global_batch(0, 0))
    model = nn.Sequential(nn.Embedding(64, 8), ReadsItsChildDirectly(8))
    victim = data.class_names[int(batch.provenance[0, 0])]
    policy = Policy(name="t", default="allow", rules=[Rule(classes=[victim], params=["1.child"], action="deny")],
                    exclusive=[], taxonomy_name=None, taxonomy_fingerprint=None, model_fingerprint=None, fingerprint="")
    router = Router(model, data.class_names, policy, [], lambda t: 1.0)
    plan = router.plan(batch.provenance[:4], 0)
    assert model[1].child in plan.splits
    loss = model(batch.inputs[:4] % 64).sum()
    with pytest.raises(RoutingError, match=r"^module 1\.child was to be split by examples but never ran, and its weight"):
        with router.guard_unrun_splits(plan):
            torch.autograd.backward(loss, inputs=plan.inputs)
    router.end_microbatch()
    data.train.close(), data.val.close()
