"""The architecture x optimizer matrix of docs/routing.md, cell by cell: G1 for every Hugging Face architecture with
every optimizer beyond AdamW (AdamW's row is proven in tests/test_hf_models.py, test_moe.py and test_ssm.py).

One class is denied a set of parameters; its examples in the last step, and only there, are replaced by noise.
The denied parameters and every tensor of their optimizer state are bitwise the same after every step, and an
allowed parameter feels the change (else nothing was proven). The step starts from real optimizer state
(moments, factored rows, momentum, Sophia's Hessian estimate, schedule-free's z). The mixture-of-experts rows
run with the load-balancing loss off (each expert's tokens split by example) and on (one routing signature
at a time); Mamba's mixers always run one signature at a time.
"""

from __future__ import annotations

import pytest
import torch

from smalti.build import build_data, build_model_for
from smalti.distributed import DistInfo

from conftest import write_policy
from helpers import assert_tree_equal, recipe
from test_hf_models import CONFIGS, hf_model
from test_moe import _plain_and_perturbed, moe_model
from test_optimizers import OPTIMIZER
from test_ssm import mamba

EXPERTS = ["model.layers.*.mlp.experts.1", "model.layers.*.mlp.gate"]
# architecture: (model section, denied parameter patterns, a parameter the victim may update)
ARCHITECTURES = {
    "llama": (hf_model("llama"), *CONFIGS["llama"][1:]),
    "mixtral-split": (moe_model("mixtral"), EXPERTS, "model.layers.1.self_attn.q_proj.weight"),
    "mixtral-signature": (moe_model("mixtral", aux=True), EXPERTS, "model.layers.1.self_attn.q_proj.weight"),
    "olmoe": (moe_model("olmoe"), EXPERTS, "model.layers.1.self_attn.q_proj.weight"),
    "qwen2_moe-signature": (moe_model("qwen2_moe", aux=True), EXPERTS + ["model.layers.0.mlp.shared_expert"],
                            "model.layers.1.self_attn.q_proj.weight"),
    "mamba": (mamba(), ["backbone.layers.0.mixer"], "backbone.layers.1.mixer.out_proj.weight"),
}
OPTIMIZERS = ["sgd", "adafactor", "muon", "lion", "schedulefree_adamw", "sophia"]
SETTINGS = {**OPTIMIZER, "sgd": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "sophia": {**OPTIMIZER["sophia"], "hessian_every": 1}}


def _matches(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern + ".*")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_g1_per_architecture_and_optimizer(governed, tmp_path, architecture, optimizer):
    if optimizer == "lion":
        pytest.importorskip("pytorch_optimizer")
    if optimizer == "schedulefree_adamw":
        pytest.importorskip("schedulefree")
    model, denied, allowed = ARCHITECTURES[architecture]
    steps = 3
    sections = dict(model=model, data={"batching": "random"}, optimizer=SETTINGS[optimizer],
                    train={"max_duration": f"{steps}ba", "microbatch_size": 4})
    probe = build_data(recipe(governed.recipe(**sections)), DistInfo())
    last = probe.sampler.global_batch(0, steps - 1)
    classes = probe.train.gather(last).provenance[:, 0]
    assert len(set(classes.tolist())) > 1, "the step should mix classes"
    victim = int(classes[0])
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": [probe.class_names[victim]], "params": denied, "action": "deny"}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    watched = [n for n, _ in build_model_for(config, probe).named_parameters() if any(_matches(n, d) for d in denied)]
    probe.train.close(), probe.val.close()
    assert len(watched) >= 3, watched
    (plain, a), (perturbed, b) = _plain_and_perturbed(config, tmp_path, victim, {int(i) for i in last}, watched)
    assert len(a) == steps
    for step, (x, y) in enumerate(zip(a, b)):
        assert_tree_equal(x[0], y[0], f"denied parameters after step {step}")
        assert_tree_equal(x[1], y[1], f"their {optimizer} state after step {step}")
    assert any(state for state in a[-2][1].values()), "no optimizer state before the last step: nothing was proven"
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), "an allowed parameter must feel it"
