"""Algorithms under governance: what they change is what the ledger records, and the engine refuses what
an algorithm says it cannot honour. Model surgery: one fixed order, recorded, checked on resume."""

from __future__ import annotations

import json

import pytest
import torch

from smalti.core.callback import Callback
from smalti.errors import CheckpointError, RecipeError
from smalti.trainer import Trainer

from helpers import recipe
from test_algorithms import digits_recipe
from test_ledger import entries

pytest.importorskip("sklearn")


class BatchCapture(Callback):
    """What each step loaded and what it trained on, after the algorithms ran (callbacks run after them)."""

    def __init__(self):
        self.steps = []

    def after_dataloader(self, state, logger):
        self.steps.append((state.batch.sample_ids.clone(), state.batch.provenance.clone()))


def ledger_digits(governed, algorithms, steps=3):
    return digits_recipe(algorithms=algorithms, train={"max_duration": f"{steps}ba", "microbatch_size": None},
                         governance={"ledger": {"enabled": True, "key": str(governed.key("trainer")),
                                                "entropy_every": 0}})


def test_mixup_examples_count_under_both_classes_in_the_ledger(governed, tmp_path):
    capture = BatchCapture()
    with Trainer(recipe(ledger_digits(governed, {"mixup": {"alpha": 1.0}})), tmp_path / "run", callbacks=[capture]) as trainer:
        trainer.fit()
    classes = trainer.data.class_names
    steps = [e for e in entries(tmp_path / "run") if e.get("kind") == "step"]
    assert len(steps) == 3
    saw_mixed = False
    for entry, (ids, provenance) in zip(steps, capture.steps):
        expected, counts = {}, {}
        for example, row in zip(ids.tolist(), provenance.tolist()):
            names = sorted(classes[c] for c in set(row) if c >= 0)
            saw_mixed |= len(names) == 2
            expected.setdefault("+".join(names), []).append(example)
            for name in names:
                counts[name] = counts.get(name, 0) + 1
        assert {k: sorted(v) for k, v in entry["examples"].items()} == {k: sorted(v) for k, v in expected.items()}
        assert entry["counts"] == dict(sorted(counts.items()))
        assert sum(entry["counts"].values()) > len(ids)  # mixed examples are counted once per class
    assert saw_mixed


def test_selective_backprop_records_the_dropped_examples(governed, tmp_path):
    loaded = BatchCapture()
    algorithms = {"selective_backprop": {"start": 0.0, "end": 1.0, "keep": 0.5, "interrupt": 0}}
    trainer = Trainer(recipe(ledger_digits(governed, algorithms)), tmp_path / "run", callbacks=[loaded])
    batches = list(trainer.data.train_batches(0, 0))[:3]  # what the loader gives, before the algorithm
    trainer.fit()
    trainer.close()
    steps = [e for e in entries(tmp_path / "run") if e.get("kind") == "step"]
    for entry, batch, (kept, _) in zip(steps, batches, loaded.steps):
        trained = sorted(i for ids in entry["examples"].values() for i in ids)
        assert trained == sorted(kept.tolist()) and len(trained) == batch.num_samples // 2
        assert sorted(entry["dropped"]) == sorted(set(batch.sample_ids.tolist()) - set(trained))


@pytest.mark.parametrize("algorithms, message", [
    ({"sam": {}}, "SAM computes gradients outside the routed backward"),
    ({"gradient_clipping": {"clipping_type": "norm", "clipping_threshold": 1.0}}, "GradientClipping computes"),
])
def test_algorithms_that_cannot_honour_routing_are_refused(governed, tmp_path, algorithms, message):
    with pytest.raises(RecipeError, match=message):
        Trainer(recipe(ledger_digits(governed, algorithms)), tmp_path / "run")


def test_adaptive_clipping_runs_under_the_ledger(governed, tmp_path):
    algorithms = {"gradient_clipping": {"clipping_type": "adaptive", "clipping_threshold": 0.01}}
    with Trainer(recipe(ledger_digits(governed, algorithms, steps=2)), tmp_path / "run") as trainer:
        trainer.fit()
    assert len([e for e in entries(tmp_path / "run") if e.get("kind") == "step"]) == 2


def test_surgery_order_is_fixed_whatever_the_recipe_order(tmp_path):
    listed = {"stochastic_depth": {"drop_rate": 0.1}, "blurpool": {"min_channels": 1},
              "squeeze_excite": {"min_channels": 8, "latent_channels": 2}, "ghost_batchnorm": {"ghost_batch_size": 8}}
    reversed_order = dict(reversed(list(listed.items())))
    a = Trainer(recipe(digits_recipe(algorithms=listed)), tmp_path / "a")
    b = Trainer(recipe(digits_recipe(algorithms=reversed_order)), tmp_path / "b")
    assert a.model.smalti_surgery == b.model.smalti_surgery == [
        "SqueezeExcite", "BlurPool", "GhostBatchNorm", "StochasticDepth"]
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    recorded = json.loads((tmp_path / "a" / "algorithms.json").read_text())
    assert recorded["surgery"] == a.model.smalti_surgery
    assert {m["name"]: m["changes"] for m in recorded["algorithms"]}["BlurPool"] == ["model"]
    # applying the same surgery again changes nothing
    from smalti.core.surgery import apply_surgery

    again = apply_surgery(a.model, a.algorithms)
    assert again is a.model and list(again.state_dict()) == list(sa)


def test_resuming_with_other_surgery_is_refused(tmp_path):
    from smalti.algorithms import BlurPool

    config = recipe(digits_recipe(train={"max_duration": "4ba"}))
    Trainer(config, tmp_path / "run").fit()
    with pytest.raises(CheckpointError, match="surgery"):
        Trainer(config, tmp_path / "run", algorithms=[BlurPool(min_channels=1)])


def test_a_run_with_surgery_can_be_sampled_and_evaluated_per_class(tmp_path, tiny_corpus):
    from conftest import tiny_recipe
    from smalti.workflows.deletion import loss_by_class
    from smalti.generation import load_generator
    from smalti.checkpoint import CheckpointStore

    config = tiny_recipe(tiny_corpus, algorithms={"gated_linear_units": {}, "alibi": {}},
                         train={"max_duration": "4ba"})
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    generator = load_generator(tmp_path / "run")
    assert "blocks.0.mlp.gate.weight" in dict(generator.model.named_parameters())
    assert isinstance(generator.sample("ROMEO", max_new_tokens=5, rng=torch.Generator().manual_seed(1)), str)
    latest = CheckpointStore(tmp_path / "run" / "checkpoints", keep=1).latest()
    losses = loss_by_class(tmp_path / "run" / "recipe.yaml", latest, 16)
    assert losses and all(v > 0 for v in losses.values())


def _entropy_freezing_run(governed, run_dir, policy=None, crash_at=None):
    from helpers import CrashAt
    from test_ledger import ledger_recipe

    sections = {"algorithms": {"layer_freezing": {"mode": "entropy", "tolerance": 0.2, "patience": 1}},
                "ledger": {"entropy_every": 2}, "train": {"max_duration": "12ba"}, "checkpoint": {"interval": "4ba"}}
    if policy is not None:
        sections["governance"] = {"policy": str(policy)}
        sections["data"] = {"batching": "per_class"}
    trainer = Trainer(recipe(ledger_recipe(governed, **sections)), run_dir,
                      callbacks=[CrashAt(crash_at)] if crash_at else [])
    try:
        trainer.fit()
    finally:
        trainer.close()
    return trainer


def _frozen_layers(run_dir):
    """For each ledger layer, the steps in which it was updated."""
    body = entries(run_dir)
    names = [layer["name"] for layer in body[0]["layers"]]
    updated = {name: [] for name in names}
    for entry in body[1:]:
        for name, row in zip(names, entry["layers"]):
            if row[0]:
                updated[name].append(entry["step"])
    return updated


def test_entropy_driven_freezing_freezes_settled_layers_and_the_ledger_shows_it(governed, tmp_path):
    trainer = _entropy_freezing_run(governed, tmp_path / "run")
    frozen = trainer.algorithms[0].state_dict()["frozen"]
    assert frozen, "nothing settled within tolerance 0.2"
    updated = _frozen_layers(tmp_path / "run")
    assert min(frozen.values()) < 12  # at least one layer froze with steps left to skip
    for unit, last_step in frozen.items():
        layers = [name for name in updated if name == unit or name.startswith(unit + ".")]
        assert layers, unit
        for name in layers:  # trained up to the profile that found it settled, never after
            assert updated[name] and max(updated[name]) == last_step, (name, updated[name], last_step)


def test_entropy_driven_freezing_never_freezes_what_the_policy_says_must_keep_learning(governed, tmp_path):
    from conftest import write_policy

    policy = write_policy(governed, tmp_path / "policy.yaml",
                          [{"classes": ["gutenberg"], "params": ["tok_emb.*", "blocks.0.*"], "action": "allow"}])
    trainer = _entropy_freezing_run(governed, tmp_path / "run", policy=policy)
    frozen = trainer.algorithms[0].state_dict()["frozen"]
    assert frozen and "tok_emb" not in frozen and "blocks.0" not in frozen
    updated = _frozen_layers(tmp_path / "run")
    assert updated["tok_emb"] and max(updated["tok_emb"]) == 12


def test_entropy_driven_freezing_resumes_bitwise(governed, tmp_path):
    from helpers import CrashAt, assert_tree_equal, latest_payload

    _entropy_freezing_run(governed, tmp_path / "reference")
    with pytest.raises(CrashAt.Crash):
        _entropy_freezing_run(governed, tmp_path / "resumed", crash_at=10)
    _entropy_freezing_run(governed, tmp_path / "resumed")
    a, b = latest_payload(tmp_path / "reference"), latest_payload(tmp_path / "resumed")
    for key in ("model", "optimizer", "algorithms"):
        assert_tree_equal(a[key], b[key], key)
    assert a["algorithms"]["LayerFreezing"]["frozen"]
    assert _frozen_layers(tmp_path / "reference") == _frozen_layers(tmp_path / "resumed")


def test_entropy_driven_freezing_needs_the_ledger(tmp_path, tiny_corpus):
    from conftest import tiny_recipe

    config = tiny_recipe(tiny_corpus, algorithms={"layer_freezing": {"mode": "entropy"}}, train={"max_duration": "2ba"})
    with pytest.raises(ValueError, match="entropy_every"):
        Trainer(recipe(config), tmp_path / "run").fit()


def test_batch_transforms_run_in_the_documented_order_whatever_the_recipe_order():
    from smalti.algorithms import build_algorithms
    from smalti.core.event import Event
    from smalti.core.passes import order_for_event

    listed = {"channels_last": {}, "selective_backprop": {}, "progressive_resizing": {}, "mixup": {}, "cutout": {},
              "randaugment": {}, "sequence_length_warmup": {"duration": "0.5dur"}}
    expected = ["SequenceLengthWarmup", "RandAugment", "CutOut", "MixUp", "ProgressiveResizing", "SelectiveBackprop",
                "ChannelsLast"]
    for configs in (listed, dict(reversed(list(listed.items())))):
        ordered = order_for_event(build_algorithms(configs), Event.AFTER_DATALOADER)
        assert [a.name for a in ordered if a.match is not None] == expected
