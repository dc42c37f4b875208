"""A diffusion model (a DDPM on diffusers' UNet2DModel) trained on the bundled digits, each digit its own class.

Each image's timestep and noise are drawn from a generator keyed by (seed, step, example id), inside the model's
forward pass. Proven here: the draws depend on nothing else (not on the other rows, the microbatch cut or the
router's splits); G1 with mixed microbatches, per optimizer; G4 against a replay that recomputes each class's
gradient from the checkpoint alone; G5 exact forget of a digit, bitwise the counterfactual; ablation of a digit
confined to its LoRA adapters; G7 with dropout on; and ``smalti sample`` writing images, with an adapter.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from smalti.core.batch import Batch
from smalti.distributed import DistInfo
from smalti.trainer import Trainer

from conftest import Governed, write_policy
from helpers import assert_tree_equal, assert_resume_is_bitwise, latest_payload, recipe

pytest.importorskip("diffusers")

TINY_UNET = {"block_out_channels": [8, 16], "attention": [False, True], "norm_num_groups": 4,
             "attention_head_dim": 4, "train_timesteps": 100}
SEVEN = "digits/odd/7"


@pytest.fixture(scope="module")
def digits(governed, tmp_path_factory) -> Governed:
    """A signed taxonomy naming the ten digits (grouped odd and even), under the governed fixture's keys."""
    from smalti.trust.keys import PublicKey, SigningKey, sign_bytes
    from smalti.trust.taxonomy import taxonomy_yaml

    root = tmp_path_factory.mktemp("digits")
    pub = lambda name: PublicKey.load(governed.keys / f"{name}.pub").text  # noqa: E731
    authorities = {"data-governance": {"role": "data-governance", "key": pub("data-governance")},
                   "model-risk": {"role": "model-risk", "key": pub("model-risk")},
                   "trainer": {"role": "trainer", "key": pub("trainer")}}
    classes = [f"digits/{'odd' if d % 2 else 'even'}/{d}" for d in range(10)]
    taxonomy = root / "taxonomy.yaml"
    taxonomy.write_text(taxonomy_yaml("digits", classes, authorities, [SEVEN]), encoding="utf-8")
    signature = sign_bytes(taxonomy.read_bytes(), SigningKey.load(governed.key("data-governance")))
    (root / "taxonomy.yaml.sig").write_text(signature.to_json(), encoding="utf-8")
    return Governed(root=governed.root, keys=governed.keys, taxonomy=taxonomy, dataset=root)


def digits_recipe(g: Governed, **sections) -> dict:
    """A 2-level, 8/16-channel UNet on the 8x8 digits, batches of 16, governed by the digits taxonomy."""
    config = {
        "seed": 5,
        "model": {"name": "diffusion", "diffusion": dict(TINY_UNET)},
        "data": {"images": "digits", "image_size": 8, "taxonomy": str(g.taxonomy), "trust": str(g.trust),
                 "batching": "random"},
        "optimizer": {"name": "adamw", "lr": 3e-3},
        "scheduler": {"warmup": "2ba"},
        "train": {"max_duration": "4ba", "global_batch_size": 16, "device": "cpu"},
        "eval": {"interval": "4ba", "max_samples": 32, "batch_size": 16},
        "checkpoint": {"interval": "4ba", "keep": 2},
        "logging": {"console": False},
    }
    for name, values in sections.items():
        config[name] = {**config[name], **values} if isinstance(config.get(name), dict) else values
    return config


def _data(config: dict):
    from smalti.build import build_data

    return build_data(recipe(config), DistInfo())


def _model(config: dict):
    from smalti.build import build_model

    data = _data(config)
    return build_model(recipe(config), 0, data.class_names), data


# ---------------------------------------------------------------------------------------------- the draws


def test_each_image_s_noise_depends_only_on_its_example_and_the_step(digits):
    from smalti.models.rows import set_rows

    model, data = _model(digits_recipe(digits))
    batch = data.train.gather(torch.arange(8))
    model.train()

    def run(rows: Batch, step: int) -> torch.Tensor:
        set_rows(model, rows, step)
        return model(rows.inputs)

    whole = run(batch, 3)
    assert whole.shape == (8, 2, 1, 8, 8)
    noise = whole[:, 1]
    # the same rows in another order, a subset, another batch around them: the same noise per example
    order = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    assert torch.equal(run(batch.select(order), 3)[:, 1], noise[order])
    assert torch.equal(run(batch.select(slice(2, 5)), 3)[:, 1], noise[2:5])
    perturbed = Batch(torch.rand_like(batch.inputs), batch.targets, batch.sample_ids, batch.provenance)
    assert torch.equal(run(perturbed, 3)[:, 1], noise)
    assert not torch.equal(run(batch, 4)[:, 1], noise), "another step draws other noise"
    # the global generator is neither read nor moved
    before = torch.get_rng_state()
    torch.manual_seed(99)
    assert torch.equal(run(batch, 3), whole)
    torch.set_rng_state(before)
    # evaluation has its own key: the same at every evaluation, not any step's
    model.eval()
    set_rows(model, batch)
    evaluation = model(batch.inputs)
    set_rows(model, batch)
    assert torch.equal(model(batch.inputs), evaluation) and not torch.equal(evaluation[:, 1], noise)
    # the loss is the mean squared error per image, summed
    expected = ((whole[:, 0] - whole[:, 1]) ** 2).flatten(1).mean(1).sum()
    torch.testing.assert_close(model.loss(whole, batch.targets), expected, rtol=0, atol=0)
    assert int(model.loss_units(batch.targets)) == 8


def test_a_forward_pass_without_its_rows_is_refused(digits):
    from smalti.models.rows import set_rows

    model, data = _model(digits_recipe(digits))
    batch = data.train.gather(torch.arange(4))
    with pytest.raises(RuntimeError, match=r"^a diffusion model's forward pass of 4 images needs their example ids "
                                           r"first \(given: none\)"):
        model(batch.inputs)
    set_rows(model, batch.select(slice(0, 2)), 0)
    with pytest.raises(RuntimeError, match=r"\(given: 2 example ids\)"):
        model(batch.inputs)
    set_rows(model, batch, 0)
    model(batch.inputs)
    with pytest.raises(RuntimeError, match="given: none"):  # used once: a stale set of rows is never reused
        model(batch.inputs)


# ---------------------------------------------------------------------------------------------- G1


class PerturbDigitInLastStep:
    """The class's images in the last step only are replaced by noise (the loader may gather several steps)."""

    def __init__(self, source, class_index: int, last_step_ids: set[int]) -> None:
        self.source, self.class_index, self.last_step_ids = source, class_index, last_step_ids

    def __getattr__(self, name):
        return getattr(self.source, name)

    def __len__(self) -> int:
        return len(self.source)

    def gather(self, indices):
        batch = self.source.gather(indices)
        in_last = torch.tensor([int(i) in self.last_step_ids for i in batch.sample_ids])
        rows = (batch.provenance == self.class_index).any(dim=1) & in_last
        images = batch.inputs.clone()
        images[rows] = torch.rand(images.shape, generator=torch.Generator().manual_seed(1234))[rows]
        return Batch(images, batch.targets, batch.sample_ids, batch.provenance)


DENIED = ["down_blocks.1.attentions", "time_embedding", "up_blocks.1.resnets.0.conv1"]


@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "adafactor", "muon", "lion", "schedulefree_adamw"])
def test_g1_a_digit_denied_the_attention_and_time_embedding_leaves_them_and_their_state_untouched(
    digits, tmp_path, optimizer
):
    """The victim digit's images in the last step are replaced by noise: the parameters it may not update, and
    every tensor of their optimizer state, are bitwise the same after every step; an allowed one feels it."""
    from test_moe import _plain_and_perturbed

    if optimizer == "lion":
        pytest.importorskip("pytorch_optimizer")
    if optimizer == "schedulefree_adamw":
        pytest.importorskip("schedulefree")
    steps = 3
    sections = dict(train={"max_duration": f"{steps}ba", "microbatch_size": 8},
                    optimizer={"name": optimizer, "lr": 3e-3})
    probe = _data(digits_recipe(digits, **sections))
    last = probe.sampler.global_batch(0, steps - 1)
    classes = probe.train.gather(last).provenance[:, 0]
    assert len(set(classes.tolist())) > 1, "the step should mix digits"
    victim = int(classes[0])
    policy = write_policy(digits, tmp_path / "policy.yaml",
                          [{"classes": [probe.class_names[victim]], "params": DENIED, "action": "deny"}])
    config = recipe(digits_recipe(digits, governance={"policy": str(policy)}, **sections))
    model, _ = _model(config.to_dict())
    forbidden = [n for n, _ in model.named_parameters() if any(n.startswith(d + ".") for d in DENIED)]
    assert len(forbidden) >= 8
    (plain, a), (perturbed, b) = _plain_and_perturbed(config, tmp_path, victim, {int(i) for i in last}, forbidden,
                                                      perturb=PerturbDigitInLastStep)
    assert not plain.router._unsplittable.any()  # every module of the UNet splits by rows
    assert len(a) == steps
    for step, (x, y) in enumerate(zip(a, b)):
        assert_tree_equal(x[0], y[0], f"forbidden parameters after step {step}")
        assert_tree_equal(x[1], y[1], f"their {optimizer} state after step {step}")
    allowed = "down_blocks.0.resnets.0.conv1.weight"
    assert not torch.equal(dict(plain.model.named_parameters())[allowed],
                           dict(perturbed.model.named_parameters())[allowed]), "an allowed parameter must feel it"


def test_sophia_is_refused_for_a_diffusion_model_in_one_line(digits):
    with pytest.raises(ValueError, match="a diffusion model predicts noise, not a distribution"):
        recipe(digits_recipe(digits, optimizer={"name": "sophia"}))


# ---------------------------------------------------------------------------------------------- G4, G5, G7


def _ledgered(digits: Governed, **sections) -> dict:
    governance = {"ledger": {"enabled": True, "key": str(digits.key("trainer"))}, **sections.pop("governance", {})}
    return digits_recipe(digits, governance=governance, **sections)


def test_g4_the_ledger_of_a_diffusion_run_equals_a_replay_from_its_checkpoints(digits, tmp_path):
    """Every (step, layer, digit) cell of the ledger against gradients recomputed from the checkpoint before the
    step, each digit's images on their own: possible because each image's noise is a function of its id."""
    from test_ledger import _replayed_cells

    config = _ledgered(digits, train={"max_duration": "4ba", "microbatch_size": 8},
                       checkpoint={"interval": "1ba", "keep": 100})
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    assert _replayed_cells(tmp_path / "run", "mixed") > 20


def test_g5_exact_forget_of_a_digit_is_bitwise_the_counterfactual(digits, tmp_path):
    from test_deletion import first_late_batch

    from smalti.trust.keys import SigningKey
    from smalti.workflows.forget import forget

    sections = dict(data={"late_classes": [SEVEN]}, train={"global_batch_size": 64, "deterministic": True},
                    checkpoint={"interval": "4ba", "keep": 1})
    late = first_late_batch(_ledgered(digits, **sections))
    assert late > 4
    config = _ledgered(digits, **{**sections, "train": {**sections["train"], "max_duration": f"{late + 3}ba"}})
    with Trainer(recipe(config), tmp_path / "parent") as trainer:
        trainer.fit()
    forget(tmp_path / "parent", SEVEN, tmp_path / "forgot", SigningKey.load(digits.key("trainer")))
    counterfactual = copy.deepcopy(config)
    counterfactual["data"]["exclude_classes"] = [SEVEN]
    with Trainer(recipe(counterfactual), tmp_path / "counterfactual") as trainer:
        trainer.fit()
    forgot, reference = latest_payload(tmp_path / "forgot"), latest_payload(tmp_path / "counterfactual")
    assert_tree_equal(forgot["model"], reference["model"], "forgotten vs counterfactual")
    assert_tree_equal(forgot["optimizer"], reference["optimizer"], "AdamW state")
    changed = "conv_out.weight"
    assert not torch.equal(forgot["model"][changed], latest_payload(tmp_path / "parent")["model"][changed])


def test_g7_a_crash_and_resume_with_dropout_on_is_bitwise_the_uninterrupted_run(digits, tmp_path):
    config = _ledgered(digits, model={"name": "diffusion", "diffusion": {**TINY_UNET, "dropout": 0.1}},
                       train={"max_duration": "6ba"}, checkpoint={"interval": "2ba"})
    assert_resume_is_bitwise(tmp_path, config)


# ---------------------------------------------------------------------------------------------- adapters


def _confined(digits: Governed, tmp_path: Path, **sections) -> dict:
    """Digit 3 confined to its own LoRA adapters on the attention's query and value projections."""
    three = "digits/odd/3"
    policy = write_policy(digits, tmp_path / "confine.yaml", [],
                          exclusive=[{"classes": [three], "params": ["@adapter"]}])
    lora = {"classes": [three], "target_modules": ["to_q", "to_v"], "r": 4, "freeze_base": False}
    return _ledgered(digits, model={"name": "diffusion", "diffusion": dict(TINY_UNET), "lora": lora},
                     governance={"policy": str(policy)}, **sections)


def test_a_digit_confined_to_its_adapter_is_forgotten_by_ablation_and_sampled_with_it(digits, tmp_path, capsys):
    from PIL import Image

    from smalti.cli.main import main
    from smalti.trust.keys import SigningKey
    from smalti.workflows.forget import forget

    config = _confined(digits, tmp_path, train={"max_duration": "6ba"}, checkpoint={"interval": "3ba"})
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    parent = latest_payload(tmp_path / "run")["model"]
    adapter = [n for n in parent if ".lora_A.digits_odd_3" in n or ".lora_B.digits_odd_3" in n]
    b_matrices = [n for n in adapter if ".lora_B." in n]
    assert b_matrices and any(parent[n].abs().sum() > 0 for n in b_matrices), "digit 3 taught its adapter"

    forget(tmp_path / "run", "digits/odd/3", tmp_path / "ablated", SigningKey.load(digits.key("trainer")),
           mode="ablate")
    ablated = latest_payload(tmp_path / "ablated")["model"]
    assert all(not ablated[n].any() for n in b_matrices), "the adapter's B is back at its initial zero"
    assert_tree_equal({n: t for n, t in ablated.items() if n not in adapter},
                      {n: t for n, t in parent.items() if n not in adapter}, "everything else as trained")
    assert main(["ledger", "verify", str(tmp_path / "ablated"), "--pubkey", str(digits.trust.with_name("trainer.pub"))]) == 0

    shared, with_adapter = tmp_path / "shared.png", tmp_path / "three.png"
    base = ["sample", str(tmp_path / "run"), "--images", "4", "--steps", "8", "--seed", "1"]
    assert main([*base, "--out", str(shared)]) == 0
    assert main([*base, "--out", str(with_adapter), "--adapter", "digits/odd/3"]) == 0
    assert "wrote 4 images (8 denoising steps with the adapter of digits/odd/3)" in capsys.readouterr().out
    pictures = [torch.from_numpy(np.array(Image.open(p))) for p in (shared, with_adapter)]
    assert Image.open(shared).size == (2 * 9 * 4, 2 * 9 * 4)  # a 2x2 grid of 8x8 images, one pixel apart, x4
    assert not torch.equal(*pictures), "switching the digit's adapter on changes what is generated"


def test_sample_refuses_what_does_not_fit_a_diffusion_run_in_one_line(digits, tmp_path, capsys):
    from smalti.cli.main import main

    config = digits_recipe(digits, train={"max_duration": "1ba"}, checkpoint={"interval": "1ba"},
                           eval={"interval": "1ba"})
    with Trainer(recipe(config), tmp_path / "run") as trainer:
        trainer.fit()
    run = str(tmp_path / "run")
    cases = [
        (["--prompt", "x"], "a diffusion model samples images: give --out FILE.png, not --prompt"),
        (["--out", str(tmp_path / "a.jpg")], "write a .png file"),
        (["--out", str(tmp_path / "none" / "a.png")], "does not exist"),
        (["--out", str(tmp_path / "a.png"), "--steps", "101"], "steps must be between 1 and the 100 training"),
        (["--out", str(tmp_path / "a.png"), "--adapter", "digits/odd/3"], "no adapter for class 'digits/odd/3'"),
        ([], "give --prompt TEXT (a text model) or --out FILE.png (a diffusion model)"),
    ]
    for extra, message in cases:
        assert main(["sample", run, *extra]) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "a.png").exists() and not list(tmp_path.glob(".a.png.*")), "nothing half-written"


# ---------------------------------------------------------------------------------------------- bad recipes


@pytest.mark.parametrize("change,message", [
    ({"model": {"name": "diffusion", "diffusion": {**TINY_UNET, "attention": [True]}}},
     "model.diffusion.attention has 1 entries for 2 levels"),
    ({"model": {"name": "diffusion", "diffusion": {**TINY_UNET, "block_out_channels": [8, 18]}}},
     "18 is not a positive multiple of norm_num_groups"),
    ({"model": {"name": "gpt"}}, "use model.name resnet or diffusion with data.images"),
])
def test_a_diffusion_recipe_that_cannot_work_is_refused_by_the_schema(digits, change, message):
    with pytest.raises(ValueError, match=message):
        recipe(digits_recipe(digits, **change))


def test_lora_targets_a_unet_does_not_have_and_a_foreign_taxonomy_are_refused_naming_the_fix(digits, governed):
    from smalti.errors import DataError, RecipeError

    lora = {"classes": ["digits/odd/3"]}  # the default targets are a language model's q_proj and v_proj
    with pytest.raises(RecipeError, match=r"^model\.lora\.target_modules \['q_proj', 'v_proj'\]: a diffusers UNet's "
                                          r"attention projections are to_q, to_k, to_v and to_out\.0"):
        _model(digits_recipe(digits, model={"name": "diffusion", "diffusion": dict(TINY_UNET), "lora": lora}))
    with pytest.raises(DataError, match=r"the digits need one leaf class per digit, ending in the digit \(e\.g\. digits/0, or digits/odd/0 to group them\); digit 0 has none"):
        _data(digits_recipe(digits, data={"taxonomy": str(governed.taxonomy)}))


# ---------------------------------------------------------------------------------------------- the recipe


def test_the_shipped_recipe_runs_as_its_comment_says_with_shorter_training(tmp_path, monkeypatch, capsys):
    """recipes/diffusion-digits.yaml's own walkthrough (keys, taxonomy, policy, train, sample with and without the
    3's adapter, ablation of the 3, exact forget of the 7), through the command line's entry point, in a fresh
    folder; only the training is shorter."""
    import yaml
    from PIL import Image

    from conftest import REPO
    from smalti.cli.main import main

    (tmp_path / "recipes" / "governance").mkdir(parents=True)
    text = (REPO / "recipes" / "diffusion-digits.yaml").read_text()
    config = yaml.safe_load(text)
    config["train"].update(max_duration="12ba", global_batch_size=128)
    config["eval"].update(interval="12ba", max_samples=64)
    config["checkpoint"].update(interval="6ba")
    (tmp_path / "recipes" / "diffusion-digits.yaml").write_text(yaml.safe_dump(config))
    policy = "governance/digits-policy.yaml"
    (tmp_path / "recipes" / policy).write_text((REPO / "recipes" / policy).read_text())
    lines, commands = [line.removeprefix("#").strip() for line in text.splitlines() if line.startswith("#  ")], []
    for line in lines:
        if line.startswith("smalti "):
            commands.append(line.removeprefix("smalti "))
        else:
            commands[-1] += " " + line
    assert [c.split()[0] for c in commands] == ["keys"] * 3 + ["taxonomy", "sign", "policy", "sign", "train",
                                                               "sample", "sample", "forget", "forget"]
    monkeypatch.chdir(tmp_path)  # the commands' paths are relative to the repository root, as written
    for command in commands:
        if command.startswith("sample"):
            command += " --images 4 --steps 20"
        capsys.readouterr()
        code = main(command.split())
        out = capsys.readouterr()
        assert code in (0, None), f"smalti {command}: {out.err[-2000:]}"
    folder = tmp_path / "diffusion-digits"
    for picture in ("samples.png", "threes.png"):
        assert Image.open(folder / picture).size == (2 * 17 * 4, 2 * 17 * 4)  # 2x2 of 16x16, one pixel apart, x4
    certificates = sorted(folder.glob("without-*/deletion-certificate.json"))
    assert [c.parent.name for c in certificates] == ["without-3", "without-7"]
