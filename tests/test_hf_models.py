"""Hugging Face causal LMs and per-class LoRA adapters under routing and the ledger (tiny configs, offline)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from smalti.build import build_data
from smalti.distributed import DistInfo
from smalti.trainer import Trainer

from conftest import smalti_cli, write_policy, write_recipe
from helpers import assert_tree_equal, latest_payload, recipe
from test_routing import PerturbClass

HAMLET, MACBETH, TEMPEST = "gutenberg/tragedy/hamlet", "gutenberg/tragedy/macbeth", "gutenberg/comedy/tempest"

CONFIGS = {
    "llama": ({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32},
              ["model.embed_tokens", "model.layers.0"], "model.layers.1.self_attn.q_proj.weight"),
    "qwen2": ({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 32},
              ["model.embed_tokens", "model.layers.0"], "model.layers.1.mlp.up_proj.weight"),
    "gpt2": ({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 32,
              "bos_token_id": 0, "eos_token_id": 0},
             ["transformer.wte", "transformer.wpe", "transformer.h.0"], "transformer.h.1.attn.c_attn.weight"),
    "gpt_neox": ({"model_type": "gpt_neox", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "max_position_embeddings": 32},
                 ["gpt_neox.embed_in", "gpt_neox.layers.0"], "gpt_neox.layers.1.attention.query_key_value.weight"),
}


def hf_model(family: str = "llama", **lora) -> dict:
    model = {"hf": {"config": dict(CONFIGS[family][0])}}
    if lora:
        model["lora"] = {"r": 4, "target_modules": ["q_proj", "v_proj"], **lora}
    return model


def _trainable_state(trainer, names):
    params = dict(trainer.model.named_parameters())
    return ({n: params[n].detach().clone() for n in names},
            {n: copy.deepcopy(trainer.optimizer.state.get(params[n], {})) for n in names})


def _victim(config) -> int:
    probe = build_data(config, DistInfo())
    first = probe.train.gather(probe.sampler.global_batch(0, 0))
    victim = int(first.provenance[0, 0])  # a class the first step certainly holds
    probe.train.close(), probe.val.close()
    return victim


def _plain_and_perturbed(config, tmp_path, victim):
    plain = Trainer(config, tmp_path / "plain")
    plain.fit()
    data = build_data(config, DistInfo())
    data.train = PerturbClass(data.train, victim)
    perturbed = Trainer(config, tmp_path / "perturbed", data=data)
    perturbed.fit()
    return plain, perturbed


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_g1_a_forbidden_parameter_is_invariant_to_the_forbidden_class_in_mixed_microbatches(governed, tmp_path, family):
    """Embeddings, Linear, GPT-2's Conv1D, LayerNorm, RMSNorm and rotary attention, split by rows."""
    _, denied, allowed = CONFIGS[family]
    sections = dict(model=hf_model(family), data={"batching": "random"},
                    train={"max_duration": "1ba", "microbatch_size": 4})
    probe = recipe(governed.recipe(**sections))
    victim = _victim(probe)
    classes = build_data(probe, DistInfo()).class_names
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": [classes[victim]], "params": denied, "action": "deny"}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    plain, perturbed = _plain_and_perturbed(config, tmp_path, victim)
    assert plain.router is not None and not plain.router._unsplittable.any()  # every module splits by rows
    forbidden = [n for n in plain.router.names if any(n == d or n.startswith(d + ".") for d in denied)]
    assert len(forbidden) >= 4
    values_a, state_a = _trainable_state(plain, forbidden)
    values_b, state_b = _trainable_state(perturbed, forbidden)
    assert_tree_equal(values_a, values_b, "forbidden parameters")
    assert_tree_equal(state_a, state_b, "their optimizer state")
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), "an allowed parameter must feel it"


def test_a_class_confined_to_its_lora_adapter_reaches_nothing_else(governed, tmp_path):
    sections = dict(model=hf_model("llama", classes=[HAMLET, MACBETH], freeze_base=False),
                    data={"batching": "random"}, train={"max_duration": "2ba", "microbatch_size": 4})
    probe = recipe(governed.recipe(**sections))
    classes = build_data(probe, DistInfo()).class_names
    policy = write_policy(governed, tmp_path / "policy.yaml", [],
                          [{"classes": [HAMLET], "params": ["@adapter"]}, {"classes": [MACBETH], "params": ["@adapter"]}])
    config = recipe(governed.recipe(governance={"policy": str(policy)}, **sections))
    plain, perturbed = _plain_and_perturbed(config, tmp_path, classes.index(HAMLET))
    names = plain.router.names
    own = [n for n in names if ".gutenberg_tragedy_hamlet." in n]
    others = [n for n in names if n not in own]
    assert len(own) == 8 and any(".gutenberg_tragedy_macbeth." in n for n in others)
    assert_tree_equal(_trainable_state(plain, others)[0], _trainable_state(perturbed, others)[0], "everything else")
    assert any(not torch.equal(a, b) for a, b in zip(_trainable_state(plain, own)[0].values(),
                                                      _trainable_state(perturbed, own)[0].values()))


def test_a_lora_adapter_adds_nothing_for_other_classes_and_starts_at_zero(governed):
    from smalti.build import build_model
    from smalti.models.adapters import set_row_classes

    config = recipe(governed.recipe(model=hf_model("llama", classes=[HAMLET])))
    data = build_data(config, DistInfo())
    torch.manual_seed(0)
    model = build_model(config, data.tokenizer.vocab_size, data.class_names)
    batch = data.train.gather(data.sampler.global_batch(0, 0))
    set_row_classes(model, batch.provenance)
    before = model(batch.inputs)
    for name, parameter in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(parameter)  # as if trained
    after = model(batch.inputs)
    hamlet_rows = batch.provenance[:, 0] == data.class_names.index(HAMLET)
    assert hamlet_rows.any() and (~hamlet_rows).any()
    assert torch.equal(before[~hamlet_rows], after[~hamlet_rows])  # gated off: bitwise the same
    assert not torch.allclose(before[hamlet_rows], after[hamlet_rows])


def test_g4_the_ledger_of_an_hf_run_equals_an_independent_replay(governed, tmp_path):
    from test_ledger import _replayed_cells, train

    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": ["gutenberg/poetry"], "params": ["model.embed_tokens"], "action": "deny"}],
                          [{"classes": [HAMLET], "params": ["@adapter"]}])
    run = train(governed, tmp_path / "run", governance={"policy": str(policy)},
                model=hf_model("llama", classes=[HAMLET], freeze_base=False),
                train={"max_duration": "6ba", "microbatch_size": 2}, data={"batching": "random"},
                checkpoint={"interval": "1ba", "keep": 100})
    assert _replayed_cells(run, "hf") > 50


def test_export_loads_in_transformers_and_peft_with_the_same_logits(governed, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from smalti.generation import load_trained_model

    policy = write_policy(governed, tmp_path / "policy.yaml", [], [{"classes": [HAMLET], "params": ["@adapter"]}])
    config = governed.recipe(model=hf_model("llama", classes=[HAMLET], freeze_base=False),
                             governance={"policy": str(policy)}, train={"max_duration": "12ba"})
    path = write_recipe(tmp_path / "r.yaml", config)
    assert smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run")).returncode == 0
    done = smalti_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    assert done.returncode == 0, done.stderr
    model, tokenizer, _ = load_trained_model(tmp_path / "run")
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)  # Hamlet trained it
    ids = torch.from_numpy(tokenizer.encode("To be, or not to be"))[None]
    with torch.no_grad():
        base_ours = model(ids)  # no class: every adapter off
        model.adapter_gates.set_on([HAMLET], batch_size=1)
        hamlet_ours = model(ids)
    assert not torch.allclose(base_ours, hamlet_ours)  # the adapter learned something
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), local_files_only=True)
    with torch.no_grad():
        assert torch.allclose(base(input_ids=ids).logits, base_ours, atol=1e-5, rtol=1e-5)
        adapted = PeftModel.from_pretrained(base, str(tmp_path / "exported" / "adapters" / "gutenberg_tragedy_hamlet"))
        assert torch.allclose(adapted(input_ids=ids).logits, hamlet_ours, atol=1e-5, rtol=1e-5)
    again = smalti_cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    assert again.returncode != 0 and "exists; name a new folder" in again.stderr


def test_bad_hf_input_is_one_line(governed, tmp_path, capsys):
    """The first case through a fresh interpreter, as a user types it; the rest through the same entry point
    in this process (each fresh interpreter spends seconds importing transformers before it can refuse)."""
    from smalti.cli.main import main

    def train(path: Path) -> tuple[int, str]:
        if path.name == "r0.yaml":
            done = smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run"))
            return done.returncode, done.stderr
        capsys.readouterr()
        code = main(["train", str(path), "--run-dir", str(tmp_path / "run")])
        return code, capsys.readouterr().err

    for number, (model, fragment) in enumerate((
            (hf_model("llama") | {"hf": {"path": str(tmp_path / "missing")}},
             "missing: not a save_pretrained folder (no config.json)"),
            ({"hf": {"config": {**CONFIGS["llama"][0], "vocab_size": 8}}},
             "the model's vocabulary has 8 tokens, the tokenizer's"),
            ({"hf": {"config": {"hidden_size": 8}}}, "needs model_type"),
            (hf_model("llama", classes=["gutenberg/opera"]), "model.lora: class 'gutenberg/opera'"))):
        path = write_recipe(tmp_path / f"r{number}.yaml", governed.recipe(model=model))
        code, stderr = train(path)
        assert code != 0 and len(stderr.strip().splitlines()) == 1, stderr
        assert fragment in stderr, stderr
        assert not (tmp_path / "run").exists()
    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": ["gutenberg/opera"], "params": ["model.layers.0"], "action": "deny"}])
    path = write_recipe(tmp_path / "r.yaml", governed.recipe(model=hf_model("llama"), governance={"policy": str(policy)}))
    code, stderr = train(path)
    assert code != 0 and "rule 1: class 'gutenberg/opera' is not in taxonomy" in stderr


def test_sampling_an_hf_run_with_and_without_an_adapter(governed, tmp_path):
    config = governed.recipe(model=hf_model("llama", classes=[HAMLET]), train={"max_duration": "2ba"})
    path = write_recipe(tmp_path / "r.yaml", config)
    assert smalti_cli("train", str(path), "--run-dir", str(tmp_path / "run")).returncode == 0
    plain = smalti_cli("sample", str(tmp_path / "run"), "--prompt", "HAMLET.", "--tokens", "20")
    adapted = smalti_cli("sample", str(tmp_path / "run"), "--prompt", "HAMLET.", "--tokens", "20", "--adapter", HAMLET)
    assert plain.returncode == 0 and adapted.returncode == 0, plain.stderr + adapted.stderr
    assert plain.stdout.startswith("HAMLET.") and len(plain.stdout.rstrip("\n")) == len("HAMLET.") + 20


def test_g5_exact_forget_of_an_hf_run_equals_the_counterfactual_bitwise(governed, tmp_path):
    from test_deletion import _train_config, late_config

    config, late = late_config(governed)
    config = {**config, "model": {**config["model"], **hf_model("llama")}}
    parent = _train_config(config, tmp_path / "parent")
    done = smalti_cli("forget", str(parent), "--class", TEMPEST, "--out", str(tmp_path / "forgot"))
    assert done.returncode == 0, done.stderr
    assert f"steps replayed: {json.loads((tmp_path / 'forgot' / 'deletion-certificate.json').read_text())['steps_replayed']}" in done.stdout
    counterfactual = _train_config({**config, "data": {**config["data"], "exclude_classes": [TEMPEST]}},
                                   tmp_path / "counterfactual")
    assert_tree_equal(latest_payload(tmp_path / "forgot")["model"], latest_payload(counterfactual)["model"], "model")
    assert not torch.equal(latest_payload(parent)["model"]["model.embed_tokens.weight"],
                           latest_payload(counterfactual)["model"]["model.embed_tokens.weight"])
    assert smalti_cli("ledger", "verify", str(tmp_path / "forgot")).returncode == 0
