"""The policy language: parsing, validation against model and taxonomy, signatures, and its exact semantics."""

import re

import pytest

from smalti.core.time import Time
from smalti.trust.keys import PublicKey
from smalti.trust.policy import Policy, PolicyError, Rule, matches, model_fingerprint
from smalti.governance.routing import Router
from smalti.trust.taxonomy import Taxonomy
from smalti.models.gpt import GPT, GPTConfig

from conftest import write_policy

HAMLET, MACBETH, TEMPEST, SONNETS = ("gutenberg/tragedy/hamlet", "gutenberg/tragedy/macbeth",
                                     "gutenberg/comedy/tempest", "gutenberg/poetry/sonnets")


def _taxonomy(g):
    return Taxonomy.load(g.taxonomy, PublicKey.load(g.trust))


def _model():
    return GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, d_model=8))


def _router(g, tmp_path, rules, exclusive=None, default="allow", extra_rules=(), model=None, total=100):
    taxonomy = _taxonomy(g)
    model = model or _model()
    policy = Policy.load(write_policy(g, tmp_path / "policy.yaml", rules, exclusive, default), taxonomy)
    names = [n for n, _ in model.named_parameters()]
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    policy.check(taxonomy, names, model_fingerprint(shapes), "policy.yaml")
    return Router(model, taxonomy.classes, policy, list(extra_rules), lambda t: t.value * total if t.unit.value == "dur" else t.value)


def test_patterns_match_parameters_and_owning_modules():
    assert matches("tok_emb", "tok_emb.weight")
    assert matches("blocks.0", "blocks.0.attn.qkv.weight") and not matches("blocks.0", "blocks.1.ln_1.weight")
    assert matches("blocks.*.mlp.*", "blocks.3.mlp.fc.bias") and not matches("blocks.*.mlp.*", "blocks.3.attn.qkv.bias")
    assert matches("*.bias", "blocks.0.ln_1.bias") and not matches("blocks.1*", "blocks.0.ln_1.weight")


def test_first_matching_rule_decides_and_nodes_cover_subtrees(governed, tmp_path):
    router = _router(governed, tmp_path, [
        {"classes": [HAMLET], "params": ["blocks.0"], "action": "allow"},  # first: Hamlet keeps blocks.0
        {"classes": ["gutenberg/tragedy"], "params": ["blocks.0", "tok_emb"], "action": "deny"},
    ])
    assert "blocks.0.ln_1.weight" in router.allowed(HAMLET) and "tok_emb.weight" not in router.allowed(HAMLET)
    assert not any(n.startswith("blocks.0") for n in router.allowed(MACBETH))  # the node covers Macbeth
    assert router.allowed(TEMPEST) == set(router.names)  # default allow


def test_default_deny_and_phases(governed, tmp_path):
    router = _router(governed, tmp_path, [
        {"classes": ["*"], "params": ["ln_f"], "action": "allow"},
        {"classes": [SONNETS], "params": ["blocks"], "action": "allow", "phase": "0.5dur..1dur"},
    ], default="deny", total=100)
    assert router.allowed(SONNETS, batch=0) == {"ln_f.weight", "ln_f.bias"}
    assert {"ln_f.weight", "blocks.1.mlp.fc.weight"} <= router.allowed(SONNETS, batch=50)
    assert router.allowed(SONNETS, batch=49) == {"ln_f.weight", "ln_f.bias"}
    assert [p.start_batch for p in router.phases] == [0, 50]


def test_exclusive_rules_confine_both_ways(governed, tmp_path):
    router = _router(governed, tmp_path, [{"classes": ["*"], "params": ["blocks.1"], "action": "deny"}],
                     exclusive=[{"classes": [HAMLET], "params": ["blocks.0.mlp"]}])
    assert router.allowed(HAMLET) == {n for n in router.names if n.startswith("blocks.0.mlp")}
    for other in (MACBETH, TEMPEST, SONNETS):
        allowed = router.allowed(other)
        assert not any(n.startswith("blocks.0.mlp") for n in allowed)
        assert not any(n.startswith("blocks.1") for n in allowed) and "tok_emb.weight" in allowed


def test_rules_from_algorithms_come_first(governed, tmp_path):
    freeze = Rule(classes=("*",), params=("blocks.0",), action="deny", phase=(Time.parse("0.5dur"), Time.parse("1dur")))
    router = _router(governed, tmp_path, [{"classes": ["*"], "params": ["blocks.0"], "action": "allow"}],
                     extra_rules=[freeze], total=10)
    assert "blocks.0.ln_1.weight" in router.allowed(TEMPEST, batch=4)
    assert "blocks.0.ln_1.weight" not in router.allowed(TEMPEST, batch=5)


@pytest.mark.parametrize("rules, exclusive, message", [
    ([{"classes": [HAMLET], "params": ["blocks.9"], "action": "deny"}], None, r"rule 1: pattern 'blocks.9' matches no parameter"),
    ([{"classes": ["gutenberg/tragedy/cardenio"], "params": ["ln_f"], "action": "deny"}], None, r"class 'gutenberg/tragedy/cardenio' is not in taxonomy"),
    ([], [{"classes": [HAMLET], "params": ["blocks.0"]}, {"classes": [MACBETH], "params": ["blocks.0.mlp"]}], r"exclusive rules 1 and 2 both claim parameter 'blocks.0.mlp"),
    ([], [{"classes": ["gutenberg/tragedy"], "params": ["blocks.0"]}, {"classes": [HAMLET], "params": ["blocks.1"]}], r"exclusive rules 1 and 2 overlap in classes"),
    ([], [{"classes": [HAMLET], "params": ["@adapter"]}], r"pattern '@adapter \(\*\.adapters\.gutenberg_tragedy_hamlet, \*\.lora_A\.gutenberg_tragedy_hamlet, .*\)' "
     r"matches no parameter"),
])
def test_invalid_policies_are_one_line_errors(governed, tmp_path, rules, exclusive, message):
    with pytest.raises(PolicyError, match=message) as info:
        _router(governed, tmp_path, rules, exclusive)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("entry, message", [
    ({"classes": [HAMLET], "params": ["ln_f"], "action": "block"}, "'action' must be allow or deny"),
    ({"classes": [HAMLET], "params": ["ln_f"], "action": "deny", "phase": "half"}, "phase 'half' must be"),
    ({"classes": [HAMLET], "params": ["ln_f"], "action": "deny", "when": "0ba"}, "unknown key 'when'"),
    ({"classes": [], "params": ["ln_f"], "action": "deny"}, "'classes' must be a non-empty list"),
])
def test_malformed_rules(entry, message):
    import yaml

    with pytest.raises(PolicyError, match=message):
        Policy.parse(yaml.safe_dump({"policy": "x", "rules": [entry]}).encode(), "p.yaml")


def test_signature_and_bindings(governed, tmp_path):
    taxonomy = _taxonomy(governed)
    names = [n for n, _ in _model().named_parameters()]
    fingerprint = model_fingerprint([(n, tuple(p.shape)) for n, p in _model().named_parameters()])
    rules = [{"classes": [HAMLET], "params": ["ln_f"], "action": "deny"}]
    unsigned = write_policy(governed, tmp_path / "a.yaml", rules, sign_with=None)
    with pytest.raises(Exception, match="not signed"):
        Policy.load(unsigned, taxonomy)
    wrong = write_policy(governed, tmp_path / "b.yaml", rules, sign_with="tagger")
    with pytest.raises(PolicyError, match="not by the model-risk authority's key"):
        Policy.load(wrong, taxonomy)
    altered = write_policy(governed, tmp_path / "c.yaml", rules)
    altered.write_text(altered.read_text().replace("deny", "allow"))
    with pytest.raises(Exception, match="does not match the content"):
        Policy.load(altered, taxonomy)
    other_model = write_policy(governed, tmp_path / "d.yaml", rules, model={"fingerprint": "0" * 64})
    with pytest.raises(PolicyError, match="written for a model with fingerprint 000000000000"):
        Policy.load(other_model, taxonomy).check(taxonomy, names, fingerprint, "d.yaml")
    policy = Policy.load(write_policy(governed, tmp_path / "e.yaml", rules), taxonomy)
    policy.taxonomy_fingerprint = "f" * 64
    with pytest.raises(PolicyError, match="written for taxonomy ffffffffffff"):
        policy.check(taxonomy, names, fingerprint, "e.yaml")


def test_model_fingerprint_depends_on_names_and_shapes():
    a = model_fingerprint([("w", (2, 3)), ("b", (3,))])
    assert a == model_fingerprint([("b", (3,)), ("w", (2, 3))])
    assert a != model_fingerprint([("w", (3, 2)), ("b", (3,))]) and a != model_fingerprint([("w", (2, 3))])


def test_policy_check_bind_sign_check_through_the_cli(governed, tmp_path):
    import yaml

    from conftest import smalti_cli, write_recipe

    draft = tmp_path / "draft.yaml"
    draft.write_text(yaml.safe_dump({"policy": "demo", "default": "allow", "rules": [
        {"classes": ["gutenberg/tragedy"], "params": ["tok_emb"], "action": "deny"},
        {"classes": ["*"], "params": ["blocks.0"], "action": "deny", "phase": "0.5dur..1dur"}],
        "exclusive": [{"classes": [HAMLET], "params": ["@adapter"]}]}))
    recipe_path = write_recipe(tmp_path / "recipe.yaml", governed.recipe(
        model={"adapters": {"classes": [HAMLET], "hidden": 8}}, train={"max_duration": "10ba"}))
    bound = tmp_path / "policy.yaml"
    done = smalti_cli("policy", "check", str(draft), "--recipe", str(recipe_path), "--bind", str(bound))
    assert done.returncode == 0, done.stderr
    assert "bound to taxonomy" in done.stdout and "phase: batches 0..5" in done.stdout and "phase: batches 5..10" in done.stdout
    unsigned = smalti_cli("policy", "check", str(bound), "--recipe", str(recipe_path))
    assert unsigned.returncode == 1 and "not signed" in unsigned.stderr
    assert smalti_cli("sign", str(bound), "--key", str(governed.key("model-risk"))).returncode == 0
    checked = smalti_cli("policy", "check", str(bound), "--recipe", str(recipe_path))
    assert checked.returncode == 0, checked.stderr
    assert "signature verified" in checked.stdout and "blocks.0.mlp.adapters.gutenberg_tragedy_hamlet.fc" in checked.stdout
    assert "✓" in checked.stdout and "✗" in checked.stdout
    assert "…" not in checked.stdout and "1 classes" not in checked.stdout  # headers and names never cut
    assert re.search(r"\(\d\) hamlet\b", checked.stdout)  # a group is named by its classes, not only counted

    broken = tmp_path / "broken.yaml"
    broken.write_text(draft.read_text().replace("tok_emb", "tok_embedding"))
    failed = smalti_cli("policy", "check", str(broken), "--recipe", str(recipe_path), "--bind", str(tmp_path / "x.yaml"))
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1
    assert "pattern 'tok_embedding' matches no parameter" in failed.stderr and not (tmp_path / "x.yaml").exists()


def test_sample_with_and_without_an_adapter(governed, tmp_path, capsys):
    import torch

    from smalti.cli.main import main
    from smalti.generation import load_generator

    from conftest import write_recipe

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    recipe_path = write_recipe(tmp_path / "recipe.yaml", governed.recipe(
        model={"adapters": {"classes": [HAMLET], "hidden": 8}}, governance={"policy": str(policy)},
        optimizer={"lr": 0.05}, train={"max_duration": "12ba", "microbatch_size": 2}, data={"batching": "per_class"}))
    assert main(["train", str(recipe_path), "--run-dir", str(tmp_path / "run")]) == 0
    for adapters in ([], ["--adapter", HAMLET]):
        assert main(["sample", str(tmp_path / "run"), "--prompt", "HAMLET.", "--tokens", "20", *adapters]) == 0
    capsys.readouterr()
    generator = load_generator(tmp_path / "run", adapters=[HAMLET])
    prompt = torch.as_tensor(generator.tokenizer.encode("HAMLET. To be"))[None]
    generator.model.adapter_gates.set_on([HAMLET], batch_size=1)
    with_adapter = generator.model(prompt)
    generator.model.adapter_gates.set_on([], batch_size=1)
    assert not torch.equal(with_adapter, generator.model(prompt)), "Hamlet's adapter learned nothing"
    assert main(["sample", str(tmp_path / "run"), "--prompt", "A", "--adapter", TEMPEST]) == 1
    assert "no adapter for class 'gutenberg/comedy/tempest'" in capsys.readouterr().err
