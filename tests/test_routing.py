"""Guarantee G1, routing exactness, proven against perturbations and an independent reference."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smalti.build import build_data
from smalti.core.callback import Callback
from smalti.core.batch import Batch
from smalti.distributed import DistInfo
from smalti.errors import SmaltiError
from smalti.functional import freeze_times, freezing_units, frozen_layer_count
from smalti.models.gpt import GPT, GPTConfig
from smalti.trainer import Trainer

from conftest import tiny_recipe, write_policy
from helpers import CrashAt, assert_tree_equal, latest_payload, losses, recipe

HAMLET, MACBETH, TEMPEST, SONNETS = ("gutenberg/tragedy/hamlet", "gutenberg/tragedy/macbeth",
                                     "gutenberg/comedy/tempest", "gutenberg/poetry/sonnets")


class WrappedSource:
    """An example source that changes what another one gathers (subclasses say how)."""

    def __init__(self, source, class_index: int) -> None:
        self.source, self.class_index = source, class_index
        self.classes, self.fingerprint = source.classes, source.fingerprint

    def __len__(self):
        return len(self.source)


class PerturbClass(WrappedSource):
    """Replaces every example of one class by other (fixed, random) content and labels."""

    def gather(self, indices):
        batch = self.source.gather(indices)
        rows = (batch.provenance == self.class_index).any(dim=1)
        window = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1).clone()
        generator = torch.Generator().manual_seed(1234)
        noise = torch.randint(0, int(window.max()) + 1, window.shape, generator=generator)
        window[rows] = noise[rows]
        return Batch(window[:, :-1], window[:, 1:], batch.sample_ids, batch.provenance)


class AlsoClass(WrappedSource):
    """Gives every third row a second class, as MixUp would (provenance [B, 2])."""

    def gather(self, indices):
        batch = self.source.gather(indices)
        second = torch.full_like(batch.provenance, -1)
        second[torch.arange(len(indices)) % 3 == 0] = self.class_index
        return Batch(batch.inputs, batch.targets, batch.sample_ids, torch.cat([batch.provenance, second], dim=1))


def _policy(g, tmp_path, rules, exclusive=None, name="policy.yaml"):
    return str(write_policy(g, tmp_path / name, rules, exclusive))


def _config(g, tmp_path, rules, exclusive=None, **sections):
    governance = {"policy": _policy(g, tmp_path, rules, exclusive)}
    return recipe(g.recipe(governance=governance, **sections))


def _state(trainer, names):
    params = dict(trainer.model.named_parameters())
    return {n: params[n].detach().clone() for n in names}, {n: copy.deepcopy(trainer.optimizer.state[params[n]]) for n in names}


# ---------------------------------------------------------------- invariance (G1)

DENY = [{"classes": [MACBETH], "params": ["blocks.0", "tok_emb"], "action": "deny"},
        {"classes": [HAMLET], "params": ["ln_f"], "action": "deny"}]


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
@pytest.mark.parametrize("batching, microbatch", [("per_class", 2), ("random", None), ("random", 4)])
def test_forbidden_update_is_bitwise_invariant_to_the_forbidden_class(governed, tmp_path, batching, microbatch, precision):
    sections = dict(data={"batching": batching},
                    train={"max_duration": "1ba", "microbatch_size": microbatch, "precision": precision})
    probe = build_data(_config(governed, tmp_path, DENY, **sections), DistInfo())
    first = probe.train.gather(probe.sampler.global_batch(0, 0))
    victim_index = int(first.provenance[0, 0])  # a class the step certainly contains (the order varies with the keys)
    victim = probe.class_names[victim_index]
    rules = [{"classes": [victim], "params": ["blocks.0", "tok_emb"], "action": "deny"},
             {"classes": [c for c in (HAMLET, MACBETH) if c != victim][:1], "params": ["ln_f"], "action": "deny"}]
    config = _config(governed, tmp_path, rules, **sections)
    data = build_data(config, DistInfo())
    macbeth = victim_index

    plain = Trainer(config, tmp_path / "plain", data=data)
    plain.fit()
    perturbed_data = build_data(config, DistInfo())
    perturbed_data.train = PerturbClass(perturbed_data.train, macbeth)
    perturbed = Trainer(config, tmp_path / "perturbed", data=perturbed_data)
    perturbed.fit()

    forbidden = [n for n in plain.router.names if n.startswith(("blocks.0.", "tok_emb"))]
    values_a, state_a = _state(plain, forbidden)
    values_b, state_b = _state(perturbed, forbidden)
    assert_tree_equal(values_a, values_b, "forbidden parameters")
    assert_tree_equal(state_a, state_b, "their optimizer state")
    changed, _ = _state(plain, ["blocks.1.attn.qkv.weight"]), None
    assert not torch.equal(changed[0]["blocks.1.attn.qkv.weight"],
                           dict(perturbed.model.named_parameters())["blocks.1.attn.qkv.weight"]), \
        "an allowed parameter should feel the perturbation (else the test proves nothing)"


# ---------------------------------------------------------------- reference (G1)


class TinyConvLM(nn.Module):
    """Embedding, causal convolution, LayerNorm, single-head attention and a linear head."""

    def __init__(self, vocab: int, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.conv = nn.Conv1d(width, width, kernel_size=3, padding=2)
        self.norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        length = idx.shape[1]
        x = self.conv(self.embed(idx).transpose(1, 2))[..., :length].transpose(1, 2)
        x = self.norm(x)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = x + F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        return self.head(x)

    loss = staticmethod(GPT.loss)
    loss_units = staticmethod(GPT.loss_units)


class CaptureStep(Callback):
    def __init__(self):
        self.grads = self.batch = None

    def before_optimizer_step(self, state, logger):
        self.grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in state.model.named_parameters()}
        self.batch = state.batch


@pytest.mark.parametrize("batching, microbatch, mixed_examples", [
    ("per_class", 2, False), ("random", 4, False), ("random", None, True), ("random", 2, True)])
def test_routed_gradients_equal_a_one_example_at_a_time_reference(governed, tmp_path, batching, microbatch, mixed_examples):
    rules = [{"classes": [MACBETH], "params": ["conv", "head"], "action": "deny"},
             {"classes": [TEMPEST], "params": ["embed", "norm"], "action": "deny"},
             {"classes": [HAMLET], "params": ["qkv.bias"], "action": "deny"}]
    config = _config(governed, tmp_path, rules, data={"batching": batching},
                     train={"max_duration": "1ba", "microbatch_size": microbatch, "grad_clip_norm": None})
    data = build_data(config, DistInfo())
    if mixed_examples:
        data.train = AlsoClass(data.train, data.class_names.index(SONNETS))
    torch.manual_seed(0)
    model = TinyConvLM(data.tokenizer.vocab_size)
    reference = copy.deepcopy(model)
    capture = CaptureStep()
    trainer = Trainer(config, tmp_path / "run", model=model, data=data, callbacks=[capture])
    trainer.fit()

    batch = capture.batch
    units = GPT.loss_units(batch.targets)
    params = dict(reference.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    table = trainer.router.phases[0].allowed
    for row in range(batch.num_samples):
        classes = [int(c) for c in batch.provenance[row] if c >= 0]
        loss = GPT.loss(reference(batch.inputs[row:row + 1]), batch.targets[row:row + 1]) / units
        grads = torch.autograd.grad(loss, list(params.values()))
        for (name, _), grad in zip(params.items(), grads):
            column = trainer.router.names.index(name)
            if all(table[c, column] for c in classes):
                expected[name] += grad
    assert any(len([c for c in r if c >= 0]) == 2 for r in batch.provenance.tolist()) == mixed_examples
    for name, want in expected.items():
        got = capture.grads[name]
        if got is None:
            assert torch.count_nonzero(want) == 0, name
        else:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=name)
    assert all(capture.grads[n] is not None for n in ("embed.weight", "conv.weight", "norm.weight", "qkv.weight", "head.weight"))


# ---------------------------------------------------------------- skipped parameters


@pytest.mark.parametrize("optimizer", [{"name": "adamw", "weight_decay": 0.1}, {"name": "sgd", "momentum": 0.9, "weight_decay": 0.1}])
def test_a_parameter_no_example_may_update_is_skipped_entirely(governed, tmp_path, optimizer):
    rules = [{"classes": ["*"], "params": ["blocks.0"], "action": "deny", "phase": "3ba..1000ba"}]
    config = _config(governed, tmp_path, rules, optimizer=optimizer, train={"max_duration": "7ba"})
    snapshots = {}

    class Snapshot(Callback):
        def batch_end(self, state, logger):
            if state.timestamp.batch in (3, 7):
                names = [n for n, _ in state.model.named_parameters()]
                params = dict(state.model.named_parameters())
                snapshots[state.timestamp.batch] = (
                    {n: params[n].detach().clone() for n in names},
                    {n: copy.deepcopy(state.optimizer.state.get(params[n], {})) for n in names},
                )

    Trainer(config, tmp_path / "run", callbacks=[Snapshot()]).fit()
    (v3, s3), (v7, s7) = snapshots[3], snapshots[7]
    frozen = [n for n in v3 if n.startswith("blocks.0.")]
    assert frozen and all(s3[n] for n in frozen), "blocks.0 had optimizer state before it froze"
    assert_tree_equal({n: v3[n] for n in frozen}, {n: v7[n] for n in frozen}, "frozen values")
    assert_tree_equal({n: s3[n] for n in frozen}, {n: s7[n] for n in frozen}, "frozen optimizer state")
    assert not torch.equal(v3["blocks.1.mlp.fc.weight"], v7["blocks.1.mlp.fc.weight"])


def test_a_plan_that_denies_no_trainable_parameter_backpropagates_without_inputs():
    """``routed_backward`` takes the plain backward pass only when no trainable parameter is denied (a
    parameter frozen by ``requires_grad`` is not denied); either way exactly the plan's inputs get gradients,
    equal to an unrouted backward pass's."""
    from smalti.governance.routing import Router, routed_backward

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, n_layer=1, n_head=2, d_model=8, block_size=8))
    model.pos_emb.weight.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randint(0, 11, (2, 8))
    reference = dict(zip(map(id, trainable), torch.autograd.grad(model(idx).square().mean(), trainable)))
    router = Router(model, ["a", "b"], None, [], lambda t: 100)
    provenance = torch.zeros(2, 1, dtype=torch.long)
    for denied in ([], ["blocks.0.mlp.fc.weight"]):
        if denied:
            router.freeze(denied, 0)
        plan = router.plan(provenance, 0)
        assert plan.every_trainable == (not denied)
        assert len(plan.inputs) == len(trainable) - len(denied)
        routed_backward(model(idx).square().mean(), plan)
        router.end_microbatch()
        for name, p in model.named_parameters():
            if name in denied or not p.requires_grad:
                assert p.grad is None, name
            else:
                assert torch.equal(p.grad, reference[id(p)]), name
            p.grad = None
    router.close()


# ---------------------------------------------------------------- exclusive rules and adapters


class ClassLog(Callback):
    """An independent witness: tensor hooks on every parameter, and the class of each microbatch."""

    def __init__(self):
        self.current = None
        self.touched: dict[str, set] = {}

    def attach(self, model):
        for name, parameter in model.named_parameters():
            parameter.register_hook(lambda grad, name=name: self.touched.setdefault(name, set()).update(self.current))

    def before_forward(self, state, logger):
        self.current = set(state.batch.provenance[:, 0].tolist())


def test_confined_class_gradient_reaches_only_its_adapter(governed, tmp_path):
    config = _config(governed, tmp_path, [], exclusive=[{"classes": [HAMLET], "params": ["@adapter"]}],
                     model={"adapters": {"classes": [HAMLET], "hidden": 8}},
                     data={"batching": "per_class"}, train={"max_duration": "12ba", "microbatch_size": 2})
    witness = ClassLog()
    trainer = Trainer(config, tmp_path / "run", callbacks=[witness])
    witness.attach(trainer.model)
    trainer.fit()
    hamlet = trainer.data.class_names.index(HAMLET)
    adapters = {n for n in trainer.router.names if ".adapters." in n}
    assert adapters and all(hamlet in witness.touched.get(n, set()) for n in adapters)
    for name, classes in witness.touched.items():
        if name in adapters:
            assert classes == {hamlet}, name
        else:
            assert hamlet not in classes, f"Hamlet's gradient reached {name}"


def test_with_an_adapter_the_shared_model_never_depends_on_the_confined_class(governed, tmp_path):
    """Gated adapters + an exclusive rule: perturbing Hamlet changes nothing outside its adapter, ever."""
    config = _config(governed, tmp_path, [], exclusive=[{"classes": [HAMLET], "params": ["@adapter"]}],
                     model={"adapters": {"classes": [HAMLET], "hidden": 8}, "dropout": 0.1},
                     data={"batching": "per_class"}, train={"max_duration": "16ba", "microbatch_size": 2})
    plain = Trainer(config, tmp_path / "plain")
    plain.fit()
    data = build_data(config, DistInfo())
    data.train = PerturbClass(data.train, data.class_names.index(HAMLET))
    perturbed = Trainer(config, tmp_path / "perturbed", data=data)
    perturbed.fit()
    a, b = dict(plain.model.named_parameters()), dict(perturbed.model.named_parameters())
    shared = [n for n in a if ".adapters." not in n]
    assert_tree_equal({n: a[n] for n in shared}, {n: b[n] for n in shared}, "shared parameters")
    assert any(not torch.equal(a[n], b[n]) for n in a if ".adapters." in n)


def test_adapters_leave_the_output_unchanged_at_initialisation(governed):
    from smalti.build import build_model

    config = recipe(governed.recipe(model={"adapters": {"classes": [HAMLET, TEMPEST], "hidden": 8}}))
    data = build_data(config, DistInfo())
    torch.manual_seed(0)
    with_adapters = build_model(config, data.tokenizer.vocab_size, data.class_names)
    torch.manual_seed(0)
    without = build_model(recipe(governed.recipe()), data.tokenizer.vocab_size, data.class_names)
    batch = data.train.gather(torch.arange(8))
    with_adapters.adapter_gates.set_provenance(batch.provenance)
    assert torch.equal(with_adapters(batch.inputs), without(batch.inputs))
    names = [n for n, _ in with_adapters.named_parameters() if ".adapters." in n]
    assert "blocks.0.mlp.adapters.gutenberg_tragedy_hamlet.fc.weight" in names and len(names) == 2 * 2 * 4


# ---------------------------------------------------------------- refusals


@pytest.mark.parametrize("mutation, message", [
    ("unsigned", "not signed"),
    ("altered", "does not match the content"),
    ("wrong signer", "not by the model-risk authority's key"),
    ("other taxonomy", "written for taxonomy"),
    ("no adapters", "matches no parameter"),
])
def test_tampered_or_mismatched_policies_refuse_to_train(governed, tmp_path, mutation, message):
    from smalti.trust.keys import SigningKey, sign_bytes

    path = tmp_path / "policy.yaml"
    write_policy(governed, path, [{"classes": [MACBETH], "params": ["ln_f"], "action": "deny"}],
                 [{"classes": [HAMLET], "params": ["@adapter"]}])
    adapters = {"adapters": {"classes": [HAMLET], "hidden": 8}}
    if mutation == "unsigned":
        path.with_name("policy.yaml.sig").unlink()
    elif mutation == "altered":
        path.write_text(path.read_text().replace("deny", "allow"))
    elif mutation == "wrong signer":
        path.with_name("policy.yaml.sig").write_text(sign_bytes(path.read_bytes(), SigningKey.load(governed.key("tagger"))).to_json())
    elif mutation == "other taxonomy":
        path.write_text(path.read_text().replace("fingerprint: ", "fingerprint: 0"))
        path.with_name("policy.yaml.sig").write_text(sign_bytes(path.read_bytes(), SigningKey.load(governed.key("model-risk"))).to_json())
    elif mutation == "no adapters":
        adapters = {}
    config = recipe(governed.recipe(governance={"policy": str(path)}, model=adapters))
    with pytest.raises(SmaltiError, match=message):
        Trainer(config, tmp_path / "run").fit()
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- layer freezing


def test_layer_freezing_schedule_by_hand():
    assert frozen_layer_count(0.4, 4, 0.5, 1.0) == 0
    assert frozen_layer_count(0.75, 4, 0.5, 1.0) == 2
    assert frozen_layer_count(1.0, 4, 0.5, 0.5) == 2
    assert freeze_times(4, 0.5, 1.0) == [0.625, 0.75, 0.875, 1.0]
    assert freeze_times(4, 0.0, 0.5) == [0.5, 1.0, None, None]
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=1, d_model=8))
    assert freezing_units(model) == ["tok_emb", "pos_emb", "blocks.0", "blocks.1", "ln_f"]


@pytest.mark.parametrize("with_policy", [False, True])
def test_layer_freezing_freezes_bottom_up_with_or_without_a_policy(governed, tiny_corpus, tmp_path, with_policy):
    algorithms = {"layer_freezing": {"freeze_start": 0.5, "freeze_level": 0.6}}  # 3 of 5 units by the end
    if with_policy:
        # (a rule on a layer the assertions below do not look at: under a policy each step is one class)
        config = _config(governed, tmp_path, [{"classes": [MACBETH], "params": ["blocks.1.attn"], "action": "deny"}],
                         algorithms=algorithms, train={"max_duration": "20ba"})
    else:
        config = recipe(tiny_recipe(tiny_corpus, algorithms=algorithms, train={"max_duration": "20ba"}))
    seen = {}

    class Record(Callback):
        def before_optimizer_step(self, state, logger):
            seen[state.timestamp.batch] = {n for n, p in state.model.named_parameters() if p.grad is not None}

    trainer = Trainer(config, tmp_path / "run", callbacks=[Record()])
    trainer.fit()
    # units tok_emb, pos_emb, blocks.0, blocks.1, ln_f freeze at 0.5 + 0.5 * (k / 5) / 0.6 of training:
    # k=1 at 0.667 (batch 13), k=2 at 0.833 (batch 17), k=3 at 1.0 (the end, so never during training)
    assert {"tok_emb.weight", "pos_emb.weight"} <= seen[12]
    assert "tok_emb.weight" not in seen[13] and "pos_emb.weight" in seen[16]
    assert not any(n.startswith(("tok_emb", "pos_emb")) for n in seen[17])
    assert any(n.startswith("blocks.0.") for n in seen[19]) and any(n.startswith("ln_f") for n in seen[19])


# ---------------------------------------------------------------- resume


def test_routed_training_resumes_bitwise(governed, tmp_path):
    config = _config(governed, tmp_path, DENY, exclusive=[{"classes": [HAMLET], "params": ["@adapter"]}],
                     model={"adapters": {"classes": [HAMLET], "hidden": 8}, "dropout": 0.1},
                     algorithms={"layer_freezing": {"freeze_start": 0.5}},
                     train={"max_duration": "20ba", "microbatch_size": 2}, checkpoint={"interval": "5ba"})
    Trainer(config, tmp_path / "reference").fit()
    with pytest.raises(CrashAt.Crash):
        Trainer(config, tmp_path / "resumed", callbacks=[CrashAt(13)]).fit()
    Trainer(config, tmp_path / "resumed").fit()
    a, b = latest_payload(tmp_path / "reference"), latest_payload(tmp_path / "resumed")
    for key in ("model", "optimizer", "rng", "policy_fingerprint"):
        assert_tree_equal(a[key], b[key], key)
    assert losses(tmp_path / "reference") == losses(tmp_path / "resumed")


def test_resume_refuses_another_policy(governed, tmp_path):
    config = _config(governed, tmp_path, DENY, train={"max_duration": "4ba"})
    Trainer(config, tmp_path / "run").fit()
    other = _config(governed, tmp_path, [{"classes": [HAMLET], "params": ["ln_f"], "action": "deny"}],
                    train={"max_duration": "8ba"})
    with pytest.raises(SmaltiError, match="another routing policy"):
        Trainer(other, tmp_path / "run")


# ---------------------------------------------------------------- modules routing cannot split by rows


class Scale(nn.Module):
    """A layer type the router knows nothing about (it happens to be row-wise; the router cannot prove it)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return x * self.weight


class BatchNormLM(nn.Module):
    """A language model with batch norm (statistics mix the rows of a batch) and an unknown layer type."""

    def __init__(self, vocab: int, width: int = 16) -> None:
        super().__init__()
        from smalti.models.objective import CausalLMObjective

        self.embed = nn.Embedding(vocab, width)
        self.bn = nn.BatchNorm1d(width)
        self.scale = Scale(width)
        self.head = nn.Linear(width, vocab)
        self.objective = CausalLMObjective  # loss, loss_units: the trainer's interface

    def forward(self, idx):
        x = self.embed(idx)
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        return self.head(self.scale(x))

    def loss(self, logits, targets):
        return self.objective.loss(logits, targets)

    def loss_units(self, targets):
        return self.objective.loss_units(targets)


def test_a_module_that_cannot_be_split_by_rows_gets_one_signature_at_a_time(governed, tmp_path):
    """Batch norm's statistics would carry the forbidden rows into the allowed rows' outputs: the router
    cannot split it by rows, so the trainer runs such microbatches one routing signature at a time."""
    # One step, as G1 promises: after it, allowed layers that learned from the class feed everything else.
    sections = dict(data={"batching": "random"}, train={"max_duration": "1ba", "microbatch_size": 8})
    probe = build_data(recipe(governed.recipe(**sections)), DistInfo())
    first = probe.train.gather(probe.sampler.global_batch(0, 0))
    victim = int(first.provenance[0, 0])
    assert len(first.provenance[:, 0].unique()) > 1  # the microbatch mixes classes
    config = _config(governed, tmp_path, [{"classes": [probe.class_names[victim]], "params": ["bn", "scale"],
                                           "action": "deny"}], **sections)
    forwards = []

    class CountForwards(Callback):
        def before_forward(self, state, logger):
            forwards.append(len(state.batch.provenance[:, 0].unique()))

    def run(name, perturb):
        torch.manual_seed(0)
        data = build_data(config, DistInfo())
        if perturb:
            data.train = PerturbClass(data.train, victim)
        model = BatchNormLM(data.tokenizer.vocab_size)
        trainer = Trainer(config, tmp_path / name, model=model, data=data, callbacks=[CountForwards()])
        trainer.fit()
        return trainer

    plain = run("plain", perturb=False)
    assert all(count == 1 for count in forwards), forwards  # every forward pass held one signature
    assert len(forwards) > 2  # and the mixed microbatches were split
    perturbed = run("perturbed", perturb=True)
    forbidden = ["bn.weight", "bn.bias", "scale.weight"]
    values_a, state_a = _state(plain, forbidden)
    values_b, state_b = _state(perturbed, forbidden)
    assert_tree_equal(values_a, values_b, "forbidden parameters")
    assert_tree_equal(state_a, state_b, "their optimizer state")
    assert not torch.equal(dict(plain.model.named_parameters())["head.weight"],
                           dict(perturbed.model.named_parameters())["head.weight"])


# ---------------------------------------------------------------- rows coupled by batch statistics (G1)


class TinyBatchNormLM(nn.Module):
    """Embedding, a BatchNorm over the whole microbatch's tokens, a linear head: the norm mixes the rows."""

    def __init__(self, vocab: int, width: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(self.norm(self.embed(idx).transpose(1, 2)).transpose(1, 2))

    loss = staticmethod(GPT.loss)
    loss_units = staticmethod(GPT.loss_units)


def _batch_norm_runs(governed, tmp_path, denied: list[str]) -> tuple[dict, dict, dict]:
    """One step of ``TinyBatchNormLM`` on a mixed microbatch, with a class of that step denied ``denied``, and
    the same step with that class's content replaced by noise: both final state dicts and the initial buffers."""
    sections = dict(data={"batching": "random"}, train={"max_duration": "1ba", "microbatch_size": None})
    probe = build_data(recipe(governed.recipe(**sections)), DistInfo())
    first = probe.train.gather(probe.sampler.global_batch(0, 0))
    victim_index = int(first.provenance[0, 0])
    assert len(set(first.provenance[:, 0].tolist())) > 1
    config = _config(governed, tmp_path, [{"classes": [probe.class_names[victim_index]], "params": denied,
                                           "action": "deny"}], **sections)
    states = {}
    for label in ("plain", "perturbed"):
        data = build_data(config, DistInfo())
        if label == "perturbed":
            data.train = PerturbClass(data.train, victim_index)
        torch.manual_seed(0)
        model = TinyBatchNormLM(data.tokenizer.vocab_size)
        initial = {n: b.clone() for n, b in model.named_buffers()}
        trainer = Trainer(config, tmp_path / label, model=model, data=data)
        trainer.fit()
        states[label] = {n: t.detach().clone() for n, t in trainer.model.state_dict().items()}
    return states["plain"], states["perturbed"], initial


def test_a_batch_norm_that_mixes_the_rows_makes_a_mixed_microbatch_run_one_signature_at_a_time(governed, tmp_path):
    """The victim may not update the embedding; every class may update the BatchNorm. Split by rows alone,
    the embedding's gradient from the allowed rows would flow back through batch statistics the victim's rows
    took part in: its update would depend on the victim's content (G1 broken, silently)."""
    plain, perturbed, _ = _batch_norm_runs(governed, tmp_path, ["embed"])
    assert torch.equal(plain["embed.weight"], perturbed["embed.weight"])
    assert not torch.equal(plain["head.weight"], perturbed["head.weight"])


def test_a_batch_norm_a_class_may_not_update_keeps_its_running_statistics_from_that_class(governed, tmp_path):
    """The running statistics are buffers, not parameters, but evaluation normalises by them: where a class
    may not update the norm, its rows leave them as they were (and the other rows' update them as usual)."""
    plain, perturbed, initial = _batch_norm_runs(governed, tmp_path, ["embed", "norm"])
    for name in ("norm.running_mean", "norm.running_var", "norm.weight", "embed.weight"):
        assert torch.equal(plain[name], perturbed[name]), name
    assert not torch.equal(plain["norm.running_mean"], initial["norm.running_mean"]), "the other classes update them"
    assert not torch.equal(plain["head.weight"], perturbed["head.weight"])
