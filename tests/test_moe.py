"""Mixture-of-experts language models from transformers (Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE) under governance.

The experts are unfused into one module each (``smalti.models.moe``), so that a policy names them and the
router splits each expert's tokens by the example they came from. What is proven here, each against an
independent reference where one exists:

- the unfused model computes what transformers' fused one computes, and an export loads back in transformers;
- G1 with mixed microbatches, with and without the load-balancing loss (which couples every row of a batch,
  so the microbatch runs one routing signature at a time);
- a class confined to its own expert reaches no other parameter;
- G4: the ledger's tokens per expert per class equal a recount from transformers' own router logits;
- G5 (exact forget) and G7 (kill -9 and resume) bitwise.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from smalti.build import build_data
from smalti.core.callback import Callback
from smalti.distributed import DistInfo
from smalti.trainer import Trainer

from conftest import smalti_cli, write_policy
from helpers import assert_tree_equal, assert_resume_is_bitwise, recipe
from test_optimizers import PerturbLastStep

SMALL = {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32}
CONFIGS = {
    "mixtral": {"model_type": "mixtral", **SMALL, "num_local_experts": 4, "num_experts_per_tok": 2},
    "olmoe": {"model_type": "olmoe", **SMALL, "num_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {"model_type": "qwen2_moe", **SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32},
    "qwen3_moe": {"model_type": "qwen3_moe", **SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 16, "head_dim": 8},
}
GATE = {"mixtral": ("w1", "w3", "w2"), "olmoe": ("gate_proj", "up_proj", "down_proj"),
        "qwen2_moe": ("gate_proj", "up_proj", "down_proj"), "qwen3_moe": ("gate_proj", "up_proj", "down_proj")}


def moe_model(family: str, aux: bool = False) -> dict:
    config = dict(CONFIGS[family])
    if aux:
        config.update(output_router_logits=True, router_aux_loss_coef=0.02)
    return {"hf": {"config": config}}


def _hf(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = dict(CONFIGS[family], vocab_size=64)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(settings.pop("model_type"), **settings))


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_unfused_experts_compute_what_transformers_fused_experts_compute(family, tmp_path):
    from transformers import AutoModelForCausalLM

    from smalti.models.moe import unfuse_experts

    fused = _hf(family).eval()
    unfused = copy.deepcopy(fused)
    assert unfuse_experts(unfused, family) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    names = dict(unfused.named_parameters())
    assert all(f"model.layers.1.mlp.experts.3.{n}.weight" in names for n in GATE[family])
    assert not any(n.endswith("gate_up_proj") for n in names)
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = fused(input_ids=ids).logits
        torch.testing.assert_close(unfused(input_ids=ids).logits, reference, rtol=0, atol=1e-5)
    # an export of the unfused model is a checkpoint in transformers' per-expert layout: it loads as the fused model
    unfused.save_pretrained(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", local_files_only=True).eval()
    assert isinstance(loaded.model.layers[0].mlp.experts.gate_up_proj, torch.nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, reference, rtol=0, atol=1e-5)


def test_a_deep_copy_of_an_unfused_model_runs_its_own_blocks():
    """Algorithms and tools copy models (``copy.deepcopy``): the copy's MoE blocks must compute with the copy's
    weights, not the original's."""
    from smalti.models.moe import unfuse_experts

    original = _hf("mixtral").eval()
    unfuse_experts(original, "mixtral")
    twin = copy.deepcopy(original)
    with torch.no_grad():
        for p in twin.model.layers[0].mlp.parameters():
            p.mul_(2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.equal(twin(input_ids=ids).logits, original(input_ids=ids).logits)
        block = twin.model.layers[0].mlp
        hidden = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4))
        assert torch.equal(block(hidden), type(block).forward(block, hidden))


def test_an_unknown_fused_layout_is_refused_in_one_line():
    from smalti.errors import RecipeError
    from smalti.models.moe import unfuse_experts

    with pytest.raises(RecipeError, match=r"^model\.hf: deepseek_v3 keeps its experts fused \(model\.layers\.0\.mlp"):
        unfuse_experts(_hf("mixtral"), "deepseek_v3")


class Snapshot(Callback):
    """Named parameters and their optimizer state after every step."""

    def __init__(self, names: list[str], into: list) -> None:
        self.names, self.into = names, into

    def batch_end(self, state, logger) -> None:
        params = dict(state.model.named_parameters())
        self.into.append(({n: params[n].detach().clone() for n in self.names},
                          {n: copy.deepcopy(state.optimizer.state.get(params[n], {})) for n in self.names}))


def _mixed_last_step(governed, sections, steps):
    probe = build_data(recipe(governed.recipe(**sections)), DistInfo())
    last = probe.sampler.global_batch(0, steps - 1)
    batch = probe.train.gather(last)
    assert len(set(batch.provenance[:, 0].tolist())) > 1, "the step should mix classes"
    victim = int(batch.provenance[0, 0])
    names = probe.class_names
    probe.train.close(), probe.val.close()
    return victim, names, {int(i) for i in last}


def _plain_and_perturbed(config, tmp_path, victim, last, watched, perturb=PerturbLastStep):
    """Train ``config`` twice, the second time with ``victim``'s examples in the last step (ids ``last``) replaced
    by noise (``perturb`` wraps the training source); each run with a snapshot of ``watched`` after every step."""
    runs = {}
    for label in ("plain", "perturbed"):
        data = build_data(config, DistInfo())
        if label == "perturbed":
            data.train = perturb(data.train, victim, last)
        snapshots: list = []
        trainer = Trainer(config, tmp_path / label, data=data, callbacks=[Snapshot(watched, snapshots)])
        trainer.fit()
        runs[label] = (trainer, snapshots)
    return runs["plain"], runs["perturbed"]


@pytest.mark.parametrize("family,aux", [("mixtral", False), ("mixtral", True), ("olmoe", False), ("qwen2_moe", True),
                                        ("qwen3_moe", False)])
def test_g1_a_class_denied_an_expert_and_the_gate_leaves_them_and_their_state_untouched(governed, tmp_path, family, aux):
    """The victim's examples in the last step are replaced by noise; the experts and gates it may not update,
    with their AdamW moments, are bitwise the same after every step. With the load-balancing loss on, the
    microbatch must run one routing signature at a time; without it, the experts split their tokens."""
    steps = 2
    sections = dict(model=moe_model(family, aux), data={"batching": "random"},
                    train={"max_duration": f"{steps}ba", "microbatch_size": 4})
    victim, classes, last = _mixed_last_step(governed, sections, steps)
    denied = ["model.layers.*.mlp.experts.1", "model.layers.*.mlp.gate", "model.layers.0.mlp.experts.2"]
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": [classes[victim]], "params": denied, "action": "deny"}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    probe = Trainer(config, tmp_path / "probe")
    forbidden = [n for n in probe.router.names if ".experts.1." in n or ".mlp.gate." in n or ".0.mlp.experts.2." in n]
    assert probe.router._rows_coupled() is aux and not probe.router._unsplittable.any()
    probe.close()
    assert len(forbidden) == 2 * 3 + 2 + 3  # two experts' three matrices, two gates, one more expert
    (plain, a), (perturbed, b) = _plain_and_perturbed(config, tmp_path, victim, last, forbidden)
    for step, (x, y) in enumerate(zip(a, b)):
        assert_tree_equal(x[0], y[0], f"forbidden experts and gates after step {step}")
        assert_tree_equal(x[1], y[1], f"their AdamW state after step {step}")
    assert all(state for state in a[0][1].values()), "no optimizer state before the last step: nothing was proven"
    allowed = "model.layers.1.mlp.experts.0." + GATE[family][2] + ".weight"
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), "an allowed expert must feel it"


def test_a_class_confined_to_its_own_expert_changes_nothing_else(governed, tmp_path):
    from test_ledger import HAMLET

    steps = 2
    sections = dict(model=moe_model("mixtral"), data={"batching": "random"},
                    train={"max_duration": f"{steps}ba", "microbatch_size": 4})
    _, classes, last = _mixed_last_step(governed, sections, steps)
    policy = write_policy(governed, tmp_path / "policy.yaml", [],
                          [{"classes": [HAMLET], "params": ["model.layers.*.mlp.experts.3"]}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    names = [n for n, _ in Trainer(config, tmp_path / "names").model.named_parameters()]
    own = [n for n in names if ".mlp.experts.3." in n]
    (plain, a), (perturbed, b) = _plain_and_perturbed(config, tmp_path, classes.index(HAMLET), last, names)
    others = [n for n in names if n not in own]
    assert len(own) == 6
    assert_tree_equal({n: a[-1][0][n] for n in others}, {n: b[-1][0][n] for n in others}, "everything but its expert")
    assert any(not torch.equal(a[-1][0][n], b[-1][0][n]) for n in own), "its own expert must learn from it"


class WeightsBeforeEachStep(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def batch_start(self, state, logger) -> None:
        self.weights.append({n: v.detach().clone() for n, v in state.model.state_dict().items()})


def test_g4_the_ledger_counts_each_expert_s_tokens_per_class_as_transformers_routes_them(governed, tmp_path):
    """Recounted step by step with transformers' own fused Mixtral (its router logits, top 2), loaded with
    the weights each step started from, on the examples the ledger says the step trained on."""
    from test_ledger import entries, ledger_recipe

    steps = 3
    config = recipe(ledger_recipe(governed, model=moe_model("mixtral"), data={"batching": "random"},
                                  train={"max_duration": f"{steps}ba", "microbatch_size": 4}))
    run, before = tmp_path / "run", WeightsBeforeEachStep()
    Trainer(config, run, callbacks=[before]).fit()
    assert smalti_cli("ledger", "verify", str(run)).returncode == 0
    genesis, *body = entries(run)
    assert genesis["experts"] == {"layers": ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"], "count": 4}
    data = build_data(config, DistInfo())
    reference = _hf("mixtral").eval()
    assert len(body) == len(before.weights) == steps
    for entry, weights in zip(body, before.weights):
        reference.load_state_dict(_fused(weights), strict=True)
        expected: dict[str, list[list[int]]] = {}
        for signature, ids in entry["examples"].items():
            with torch.no_grad():
                out = reference(input_ids=data.train.gather(torch.tensor(ids)).inputs, output_router_logits=True)
            layers = [torch.bincount(torch.topk(logits, 2, dim=-1).indices.flatten(), minlength=4).tolist()
                      for logits in out.router_logits]
            for name in signature.split("+"):
                table = expected.setdefault(name, [[0] * 4 for _ in layers])
                for row, counts in zip(table, layers):
                    row[:] = [a + b for a, b in zip(row, counts)]
        assert entry["expert_tokens"] == expected, f"step {entry['step']}"
    name = sorted(expected)[0]
    audited = smalti_cli("audit", str(run), "--class", name, "--json")
    assert audited.returncode == 0, audited.stderr
    reached = json.loads(audited.stdout)["experts_reached"]["model.layers.0.mlp.experts"]
    assert reached["tokens"] == [sum(e["expert_tokens"].get(name, [[0] * 4])[0][i] for e in body) for i in range(4)]
    assert reached["experts"] == [i for i, n in enumerate(reached["tokens"]) if n]
    shown = smalti_cli("audit", str(run), "--class", name)
    assert "experts its tokens were routed to" in shown.stdout and "model.layers.1.mlp.experts" in shown.stdout
    report = smalti_cli("audit", str(run), "--report", str(tmp_path / "report.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "report.html").read_text()
    assert "Tokens per expert, by class" in page and "<caption>model.layers.0.mlp.experts</caption>" in page
    row = "".join(f"<td>{n}</td>" for n in reached["tokens"])
    assert f"<tr><th>{name}</th>{row}</tr>" in page  # the class's row of layer 0, as the audit counts it


def _fused(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Smalti's per-expert Mixtral weights in transformers' fused layout (a reference written apart from
    ``smalti.models.moe``)."""
    fused, experts = {}, {}
    for name, value in weights.items():
        if ".mlp.experts." not in name:
            fused[name] = value
            continue
        prefix, rest = name.split(".mlp.experts.")
        index, projection = rest.split(".")[:2]
        experts.setdefault(prefix, {}).setdefault(int(index), {})[projection] = value
    for prefix, by_index in experts.items():
        order = sorted(by_index)
        fused[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([by_index[e]["w1"], by_index[e]["w3"]]) for e in order])
        fused[f"{prefix}.mlp.experts.down_proj"] = torch.stack([by_index[e]["w2"] for e in order])
    return fused


FAMILIES = [("mixtral", True), ("olmoe", False), ("qwen2_moe", True), ("qwen3_moe", False)]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_g4_the_ledger_of_a_moe_run_equals_an_independent_replay(governed, tmp_path, family):
    """Every (step, layer, class) gradient cell against a replay from the checkpoint before the step. (With the
    load-balancing loss on, a class's gradient depends on how its rows were cut into microbatches, which the
    replay does not redo; those families are recounted per expert above.)"""
    from test_ledger import _replayed_cells, train

    run = train(governed, tmp_path / "run", model=moe_model(family), train={"max_duration": "4ba", "microbatch_size": 2},
                data={"batching": "random"}, checkpoint={"interval": "1ba", "keep": 100})
    assert _replayed_cells(run, "mixed") > 20


@pytest.mark.parametrize("family,aux", FAMILIES)
def test_g5_exact_forget_of_a_moe_run_is_bitwise_the_counterfactual(governed, tmp_path, family, aux):
    from test_deletion import assert_exact_forget_is_the_counterfactual, late_config

    config, _ = late_config(governed)
    config = dict(config, model={**config["model"], **moe_model(family, aux=aux)})
    changed = f"model.layers.0.mlp.experts.0.{GATE[family][0]}.weight"
    assert_exact_forget_is_the_counterfactual(governed, tmp_path, config, changed)


@pytest.mark.parametrize("family,aux", FAMILIES)
def test_g7_a_crash_and_resume_of_a_moe_run_is_bitwise_the_uninterrupted_run(governed, tmp_path, family, aux):
    config = governed.recipe(model=moe_model(family, aux=aux), train={"max_duration": "6ba"},
                             checkpoint={"interval": "2ba"},
                             governance={"ledger": {"enabled": True, "key": str(governed.key("trainer"))}})
    if family == "mixtral":
        config["model"]["hf"]["config"]["router_jitter_noise"] = 0.1  # the router's own randomness, resumed too
    assert_resume_is_bitwise(tmp_path, config)


@pytest.mark.parametrize("run, step, message", [
    ({"experts": {"layers": ["a"], "count": 10**9}}, None, r"experts: expected \{layers, count\} with 1 to 4096"),
    ({"experts": {"layers": "a", "count": 4}}, None, "experts"),
    (None, {"expert_tokens": {"x": [[1, -2]]}}, "expert_tokens: expected per class a table"),
    (None, {"expert_tokens": {"x": [[1, 2.5]]}}, "expert_tokens"),
    (None, {"expert_tokens": {"x": [[1, 2, 3]]}}, "expert_tokens: not a run class's table"),  # 3 experts, not 2
    (None, {"expert_tokens": {"y": [[1, 2]]}}, "expert_tokens: not a run class's table"),  # a class the run lacks
    (None, {"expert_tokens": {"x": [[1, 2], [3, 4]]}}, "expert_tokens: not a run class's table"),  # two layers
])
def test_a_hostile_ledger_s_expert_tables_are_refused(run, step, message):
    """What an audited party signs with its own key is still checked: types, bounds (a reader allocates a
    row per expert) and shapes against the run entry."""
    from smalti.governance.ledger.audit import check_step_shape
    from smalti.trust.entry import EntryFormatError, ZERO_HASH, decode_entry, encode_entry

    genesis = {"kind": "run", "classes": ["x"], "layers": [], "experts": {"layers": ["m.experts"], "count": 2}}
    body = {"kind": "step", "step": 1, "expert_tokens": {"x": [[1, 2]]}}
    check_step_shape(genesis, body)  # the well-formed pair passes
    with pytest.raises(EntryFormatError, match=message):
        if run is not None:
            decode_entry(encode_entry(0, ZERO_HASH, {**genesis, **run}))
        else:
            decoded = decode_entry(encode_entry(1, ZERO_HASH, {**body, **step})).body
            check_step_shape(genesis, decoded)
