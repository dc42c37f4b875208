"""Optimizers other than AdamW under governance: G1, G5 and G7 for each, and ablation of their state.

AdamW and SGD are proven by the routing, deletion and fault tests; each optimizer here keeps a different
state (Adafactor: factored rows and columns; Muon: a momentum it orthogonalises per matrix, beside an
AdamW for the rest; Lion: a sign of an interpolated momentum; schedule-free AdamW: a base sequence ``z``
beside the weights, and an average it evaluates at; Sophia: a Hessian estimate from a second, sampled-label
backward pass), which is where a forbidden class could leak.
"""

from __future__ import annotations

import copy

import pytest
import torch

from smalti.build import build_data
from smalti.config import OptimizerConfig
from smalti.core.batch import Batch
from smalti.core.callback import Callback
from smalti.distributed import DistInfo
from smalti.optimizers import KINDS, MuonWithAdamW, build_optimizer, optimizer_parameter_names, parameter_groups
from smalti.trainer import Trainer
from smalti.trust.keys import SigningKey

from conftest import smalti_cli, write_policy, write_recipe
from helpers import assert_tree_equal, assert_resume_is_bitwise, latest_payload, recipe
from test_routing import PerturbClass

NEW = ["adafactor", "muon", "lion", "schedulefree_adamw", "sophia"]
OPTIMIZER = {"adafactor": {"name": "adafactor", "lr": 1e-2}, "muon": {"name": "muon", "lr": 2e-2},
             "lion": {"name": "lion", "lr": 1e-4, "betas": [0.9, 0.99]},
             "schedulefree_adamw": {"name": "schedulefree_adamw", "lr": 3e-3, "betas": [0.9, 0.99]},
             "sophia": {"name": "sophia", "lr": 1e-3, "betas": [0.965, 0.99], "hessian_every": 2}}
FORBIDDEN = ("blocks.0.", "tok_emb")  # a block of matrices (Muon's) and the embedding (Muon's AdamW)


class Snapshot(Callback):
    """The forbidden parameters and their optimizer state after every step."""

    def __init__(self, into: list) -> None:
        self.into = into

    def batch_end(self, state, logger) -> None:
        params = dict(state.model.named_parameters())
        names = [n for n in params if n.startswith(FORBIDDEN)]
        self.into.append(({n: params[n].detach().clone() for n in names},
                          {n: copy.deepcopy(state.optimizer.state[params[n]]) for n in names}))


class PerturbLastStep(PerturbClass):
    """The class's examples in the last step only are replaced by noise: both runs reach that step from the
    same weights and the same optimizer state, so the state it starts from is real (moments, factored
    rows, momentum), not the empty state of a first step."""

    def __init__(self, source, class_index: int, last_step_ids: set[int]) -> None:
        super().__init__(source, class_index)
        self.last_step_ids = last_step_ids

    def gather(self, indices):  # the loader may gather several steps at once: only the last step's rows change
        batch = self.source.gather(indices)
        in_last = torch.tensor([int(i) in self.last_step_ids for i in batch.sample_ids])
        rows = (batch.provenance == self.class_index).any(dim=1) & in_last
        window = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1).clone()
        noise = torch.randint(0, int(window.max()) + 1, window.shape, generator=torch.Generator().manual_seed(1234))
        window[rows] = noise[rows]
        return Batch(window[:, :-1], window[:, 1:], batch.sample_ids, batch.provenance)


@pytest.mark.parametrize("name", NEW)
def test_g1_forbidden_parameters_and_their_state_do_not_feel_the_class(governed, tmp_path, name):
    """G1 for a step that starts from real optimizer state: the forbidden parameters and every tensor of
    their state after it are bitwise the same whatever the class's examples in it were. (Across several
    perturbed steps they need not be: what the class taught the parameters it may update flows on, legitimately,
    into the next steps' gradients of all parameters.)"""
    steps = 3
    sections = dict(data={"batching": "random"}, train={"max_duration": f"{steps}ba", "microbatch_size": 4},
                    optimizer=OPTIMIZER[name])
    probe = build_data(recipe(governed.recipe(**sections)), DistInfo())
    last = probe.sampler.global_batch(0, steps - 1)
    batch = probe.train.gather(last)
    victim_index = int(batch.provenance[0, 0])  # a class the last step certainly holds
    assert len(set(batch.provenance[:, 0].tolist())) > 1, "the step should mix classes"
    victim = probe.class_names[victim_index]
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": [victim], "params": [p.rstrip(".") for p in FORBIDDEN], "action": "deny"}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))

    runs = {}
    for label in ("plain", "perturbed"):
        data = build_data(config, DistInfo())
        if label == "perturbed":
            data.train = PerturbLastStep(data.train, victim_index, {int(i) for i in last})
        snapshots: list = []
        trainer = Trainer(config, tmp_path / label, data=data, callbacks=[Snapshot(snapshots)])
        trainer.fit()
        runs[label] = (trainer, snapshots)

    (plain, plain_steps), (perturbed, perturbed_steps) = runs["plain"], runs["perturbed"]
    assert len(plain_steps) == steps
    for step, (a, b) in enumerate(zip(plain_steps, perturbed_steps)):
        assert_tree_equal(a[0], b[0], f"forbidden parameters after step {step}")
        assert_tree_equal(a[1], b[1], f"their {name} state after step {step}")
    assert all(state for state in plain_steps[-2][1].values()), "no state before the last step: nothing was proven"
    allowed = "blocks.1.attn.qkv.weight"
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), \
        "an allowed parameter should feel the perturbation (else the test proves nothing)"


@pytest.mark.parametrize("name", NEW)
def test_g7_a_crash_and_resume_is_bitwise_the_uninterrupted_run(governed, tmp_path, name):
    config = governed.recipe(train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"}, optimizer=OPTIMIZER[name])
    assert_resume_is_bitwise(tmp_path, config, f"{name} state")


@pytest.mark.parametrize("name", NEW)
def test_g5_exact_forget_is_bitwise_the_counterfactual(governed, tmp_path, name):
    from test_deletion import assert_exact_forget_is_the_counterfactual, late_config

    config, _ = late_config(governed)
    assert_exact_forget_is_the_counterfactual(governed, tmp_path, dict(config, optimizer=OPTIMIZER[name]), "tok_emb.weight")


def test_ablation_clears_every_piece_of_a_confined_parameter_s_adafactor_state(governed, tmp_path):
    """Adafactor keeps a row and a column vector per matrix, not a tensor of the matrix's shape: the reset
    must clear them too, or the class's gradients stay in the state the ablated run goes on from."""
    from smalti.workflows.forget import forget
    from test_ledger import HAMLET, ledger_recipe

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = ledger_recipe(governed, governance={"policy": str(policy)},
                           model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                           train={"max_duration": "4ba", "microbatch_size": 2}, data={"batching": "per_class"},
                           checkpoint={"interval": "2ba"}, optimizer=OPTIMIZER["adafactor"])
    Trainer(recipe(config), tmp_path / "parent").fit()
    forget(tmp_path / "parent", HAMLET, tmp_path / "ablated", SigningKey.load(governed.key("trainer")), mode="ablate")
    before, after = latest_payload(tmp_path / "parent"), latest_payload(tmp_path / "ablated")
    model = Trainer(recipe(config), tmp_path / "layout").model
    names = optimizer_parameter_names(model, recipe(config).optimizer)
    confined = [i for i, n in enumerate(names) if "adapter" in n and i in before["optimizer"]["state"]]
    assert confined, "no confined parameter had optimizer state: nothing to check"
    for index in confined:
        pieces = {k: v for k, v in after["optimizer"]["state"][index].items() if k != "step" and v.dim() > 0}
        assert pieces and all(not v.any() for v in pieces.values()), (names[index], list(pieces))
        assert any(v.any() for k, v in before["optimizer"]["state"][index].items() if k != "step" and v.dim() > 0)
    untouched = next(i for i, n in enumerate(names) if "adapter" not in n and i in before["optimizer"]["state"])
    assert_tree_equal(before["optimizer"]["state"][untouched], after["optimizer"]["state"][untouched], "unconfined")


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest_in_one_state_dict(governed):
    from smalti.build import build_model

    config = recipe(governed.recipe(optimizer=OPTIMIZER["muon"]))
    model = build_model(config, vocab_size=64)
    groups = {role: names for role, names, _ in parameter_groups(model, config.optimizer)}
    assert "tok_emb.weight" in groups["decay"] and "blocks.0.attn.qkv.weight" in groups["muon"]
    assert all(name.endswith(".weight") for name in groups["muon"]) and not any("ln" in n for n in groups["muon"])
    optimizer = build_optimizer(model, config.optimizer)
    assert isinstance(optimizer, MuonWithAdamW)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()
    assert sorted(saved["state"]) == list(range(len(optimizer_parameter_names(model, config.optimizer))))
    again = build_optimizer(model, config.optimizer)
    again.load_state_dict(copy.deepcopy(saved))
    assert_tree_equal(again.state_dict(), saved, "reloaded")
    assert {g["lr"] for g in optimizer.param_groups} == {2e-2, config.optimizer.fallback_lr}


def test_an_unknown_optimizer_is_refused_in_one_line_and_nothing_is_written(governed, tmp_path):
    path = write_recipe(tmp_path / "recipe.yaml", governed.recipe(optimizer={"name": "lamb"}))
    done = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "optimizer.name" in done.stderr and "lamb" in done.stderr and "muon" in done.stderr
    assert not (tmp_path / "run").exists()
    assert set(KINDS) == {"adamw", "sgd", "adafactor", "muon", "lion", "schedulefree_adamw", "sophia"}
    assert OptimizerConfig().name == "adamw"


def test_schedule_free_evaluates_sampling_and_export_at_its_average_and_trains_on_bitwise(governed, tmp_path):
    """Evaluation, sampling and export see ``x``, as the schedulefree package's own ``eval()`` computes it;
    training goes on from ``y`` bitwise (a run evaluating every step ends where one evaluating once does)."""
    from schedulefree import AdamWScheduleFree

    from smalti.build import build_model
    from smalti.generation import load_trained_model

    config = governed.recipe(train={"max_duration": "6ba"}, optimizer=OPTIMIZER["schedulefree_adamw"],
                             checkpoint={"interval": "6ba"})
    often = dict(config, eval={**config["eval"], "interval": "1ba"})
    Trainer(recipe(config), tmp_path / "once").fit()
    Trainer(recipe(often), tmp_path / "often").fit()
    once, every = latest_payload(tmp_path / "once"), latest_payload(tmp_path / "often")
    assert_tree_equal(once["model"], every["model"], "weights after evaluating every step vs once")
    assert_tree_equal(once["optimizer"], every["optimizer"], "schedule-free state")

    # the package's own eval() on the trained y and z is the reference for x
    model = build_model(recipe(config), vocab_size=once["model"]["tok_emb.weight"].shape[0])
    model.load_state_dict(once["model"])
    parameters = dict(model.named_parameters())
    reference = AdamWScheduleFree([{"params": [parameters[n] for n in names], "weight_decay": decay}
                                   for _, names, decay in parameter_groups(model, recipe(config).optimizer)], lr=3e-3)
    state = copy.deepcopy(once["optimizer"])
    reference.load_state_dict(state)
    reference.eval()
    x = {n: p.detach().clone() for n, p in model.named_parameters()}
    averaged, _, _ = load_trained_model(tmp_path / "once")
    raw, _, _ = load_trained_model(tmp_path / "once", weights="raw")
    got, trained = dict(averaged.named_parameters()), dict(raw.named_parameters())
    assert_tree_equal({n: got[n].detach() for n in x}, x, "sample/export weights vs schedulefree's eval()")
    assert_tree_equal({n: trained[n].detach() for n in x}, {n: once["model"][n] for n in x}, "--weights raw")
    assert any(not torch.equal(x[n], once["model"][n]) for n in x), "x and y should differ after 6 steps"


def test_schedule_free_with_an_averaging_algorithm_is_refused_in_one_line(governed, tmp_path):
    config = governed.recipe(optimizer=OPTIMIZER["schedulefree_adamw"], algorithms={"ema": {"half_life": "10ba"}})
    done = smalti_cli("train", str(write_recipe(tmp_path / "recipe.yaml", config)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "algorithms.ema" in done.stderr and "schedulefree_adamw" in done.stderr and not (tmp_path / "run").exists()


def test_ablation_resets_schedule_free_s_base_sequence_to_the_reset_weights():
    from smalti.optimizers import reset_optimizer_state

    state = {"z": torch.full((2, 2), 3.0), "exp_avg_sq": torch.ones(2, 2), "step": torch.tensor(4.0)}
    reset = torch.zeros(2, 2)
    reset_optimizer_state(state, reset)
    assert torch.equal(state["z"], reset) and not state["exp_avg_sq"].any() and state["step"] == 4


class HessianWatch(Callback):
    """Each step's Hessian estimate of one parameter, and its gradient (what the update used)."""

    def __init__(self, name: str) -> None:
        self.name, self.hessians, self.gradients = name, [], []

    def batch_end(self, state, logger) -> None:
        param = dict(state.model.named_parameters())[self.name]
        self.hessians.append(state.optimizer.state[param]["hessian"].clone())


def test_sophia_s_hessian_estimate_is_the_gauss_newton_bartlett_estimate_of_its_own_sampled_labels(governed, tmp_path):
    """An independent recomputation of the first step's estimate: the same model and batch, labels drawn with
    the loop's generator by the same Gumbel-max rule, the mean loss's gradient by plain autograd; the estimate is
    ``(1 - beta2) * B * g_hat**2``. The step's own update used the true labels' gradient, not these."""
    from smalti.build import build_model
    from smalti.sophia import sampled_labels

    config = recipe(governed.recipe(train={"max_duration": "1ba"}, optimizer=OPTIMIZER["sophia"],
                                    model={"dropout": 0.0}))
    watch = HessianWatch("blocks.0.attn.qkv.weight")
    trainer = Trainer(config, tmp_path / "run", callbacks=[watch])
    initial = {n: v.detach().clone() for n, v in trainer.model.state_dict().items()}
    batch = trainer.data.train.gather(trainer.data.sampler.global_batch(0, 0))
    trainer.fit()

    model = build_model(config, vocab_size=initial["tok_emb.weight"].shape[0])
    model.load_state_dict(initial)
    model.train()
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 0)
    logits = model(batch.inputs)
    labels = sampled_labels(logits, batch.targets, generator)
    units = model.loss_units(batch.targets)
    (model.loss(logits, labels) / units).backward()
    g_hat = dict(model.named_parameters())["blocks.0.attn.qkv.weight"].grad
    expected = (1 - 0.99) * float(units) * g_hat * g_hat
    torch.testing.assert_close(watch.hessians[0], expected, rtol=1e-5, atol=1e-12)
    assert watch.hessians[0].any()


def test_sophia_under_torchrun_or_fp16_is_refused_in_one_line(governed, tmp_path):
    config = governed.recipe(optimizer=OPTIMIZER["sophia"], train={"precision": "amp_fp16"})
    done = smalti_cli("train", str(write_recipe(tmp_path / "recipe.yaml", config)), "--run-dir", str(tmp_path / "run"))
    assert done.returncode != 0 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "optimizer.name sophia" in done.stderr and not (tmp_path / "run").exists()
