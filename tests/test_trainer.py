import math

import pytest
import torch

from smalti.core.callback import Callback
from smalti.errors import CheckpointError, RecipeError
from smalti.trainer import Trainer

from conftest import tiny_recipe
from helpers import assert_tree_equal, crash_and_resume, eval_losses, latest_payload, losses, recipe


class GradientCapture(Callback):
    def __init__(self):
        self.gradients = None

    def before_optimizer_step(self, state, logger):
        self.gradients = {n: p.grad.clone() for n, p in state.model.named_parameters()}


def _one_step(tmp_path, tiny_corpus, name, microbatch_size, optimizer="sgd"):
    capture = GradientCapture()
    config = tiny_recipe(
        tiny_corpus,
        train={"max_duration": "1ba", "global_batch_size": 8, "microbatch_size": microbatch_size, "grad_clip_norm": None},
        optimizer={"name": optimizer, "lr": 0.1, "momentum": 0.0},
    )
    trainer = Trainer(recipe(config), tmp_path / name, callbacks=[capture])
    trainer.fit()
    return capture.gradients, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_gradient_accumulation_equals_full_batch(tmp_path, tiny_corpus):
    full_grads, full_params = _one_step(tmp_path, tiny_corpus, "full", None)
    micro_grads, micro_params = _one_step(tmp_path, tiny_corpus, "micro", 2)  # 4 microbatches
    assert full_grads.keys() == micro_grads.keys()
    for name in full_grads:
        assert full_grads[name].abs().max() > 0, name
        torch.testing.assert_close(micro_grads[name], full_grads[name], rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(micro_params[name], full_params[name], rtol=0, atol=1e-6, msg=name)


def test_training_reduces_loss_and_writes_run_dir(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "40ba"}, eval={"interval": "20ba"})
    result = Trainer(recipe(config), tmp_path / "run").fit()
    curve = losses(tmp_path / "run")
    assert [b for b, _ in curve] == list(range(1, 41))
    assert curve[-1][1] < curve[0][1] - 0.5
    assert [b for b, _ in eval_losses(tmp_path / "run")] == [20, 40]
    assert result.eval_metrics["eval/loss"] < math.log(60)
    assert result.timestamp.batch == 40 and result.timestamp.token == 40 * 8 * 16
    assert (tmp_path / "run" / "recipe.yaml").is_file() and (tmp_path / "run" / "vocab.json").is_file()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert names == ["ep0-ba32.pt", "ep0-ba40.pt"]  # keep: 2


ALGORITHM_CASES = {
    "none": {},
    "label_smoothing": {"label_smoothing": {"smoothing": 0.1}},
    "ema": {"ema": {"half_life": "4ba"}},
    "sequence_length_warmup": {"sequence_length_warmup": {"duration": "0.5dur", "min_seq_length": 4, "step_size": 4}},
    "sequence_length_warmup_reshape": {
        "sequence_length_warmup": {"duration": "0.5dur", "min_seq_length": 4, "step_size": 4, "truncate": False}
    },
    "all_three": {
        "sequence_length_warmup": {"duration": "0.5dur", "min_seq_length": 4, "step_size": 4},
        "label_smoothing": {"smoothing": 0.1},
        "ema": {"half_life": "4ba"},
    },
}


def test_evaluation_records_each_class_loss_and_a_resume_restores_it(tmp_path, tiny_corpus):
    """Each class's held-out loss, as the final checkpoint carries it, against a row-by-row float64 recount."""
    from smalti.workflows.deletion import loss_by_class
    from smalti.models.adapters import set_row_classes

    config = tiny_recipe(tiny_corpus, train={"max_duration": "12ba"}, eval={"interval": "12ba", "batch_size": 5})
    trainer = Trainer(recipe(config), tmp_path / "run")
    trainer.fit()
    payload = latest_payload(tmp_path / "run")
    recorded = payload["eval_by_class"]
    assert payload["evaluated_at"] == payload["timestamp"]["batch"] == 12
    totals: dict[str, list[float]] = {}
    model = trainer.model.eval()
    with torch.no_grad():
        for batch in trainer.data.eval_batches(5, 32):
            set_row_classes(model, batch.provenance)
            logits = model(batch.inputs)
            for row in range(batch.num_samples):
                part = totals.setdefault(trainer.data.class_names[int(batch.provenance[row, 0])], [0.0, 0.0])
                part[0] += float(model.loss(logits[row:row + 1], batch.targets[row:row + 1]))
                part[1] += float(model.loss_units(batch.targets[row:row + 1]))
    assert len(totals) > 1 and set(recorded) == set(totals)
    for name, (loss, units) in totals.items():
        assert recorded[name] == pytest.approx(loss / units, abs=2e-6), name
    latest = tmp_path / "run" / "checkpoints" / (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert loss_by_class(tmp_path / "run" / "recipe.yaml", latest) == recorded  # `smalti eval --by-class`'s numbers
    trainer.close()
    resumed = Trainer(recipe(config), tmp_path / "run")
    assert resumed.state.eval_by_class == recorded
    resumed.close()


@pytest.mark.parametrize("case", sorted(ALGORITHM_CASES))
def test_crash_and_resume_is_bitwise_exact(tmp_path, tiny_corpus, case):
    config = tiny_recipe(tiny_corpus, algorithms=ALGORITHM_CASES[case], model={"dropout": 0.1}, train={"max_duration": "24ba", "microbatch_size": 4})
    reference, resumed, _ = crash_and_resume(tmp_path, config, crash_at=13)
    a, b = latest_payload(reference), latest_payload(resumed)
    for key in ("model", "optimizer", "algorithms", "timestamp", "rng", "sampler", "eval_metrics", "eval_by_class"):
        assert_tree_equal(a[key], b[key], key)
    assert losses(reference) == losses(resumed)
    assert eval_losses(reference) == eval_losses(resumed)
    assert len(losses(resumed)) == 24


def test_resume_across_epoch_boundary(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "2ep", "global_batch_size": 128},
                         eval={"interval": "1ep"}, checkpoint={"interval": "3ba"})
    reference, resumed, _ = crash_and_resume(tmp_path, config, crash_at=11)
    assert_tree_equal(latest_payload(reference)["model"], latest_payload(resumed)["model"])
    assert losses(reference) == losses(resumed) and eval_losses(reference) == eval_losses(resumed)
    assert latest_payload(resumed)["timestamp"]["epoch"] == 2


def test_changed_recipe_refuses_to_resume(tmp_path, tiny_corpus):
    Trainer(recipe(tiny_recipe(tiny_corpus, train={"max_duration": "8ba"})), tmp_path / "run").fit()
    changed = tiny_recipe(tiny_corpus, train={"max_duration": "8ba"}, optimizer={"lr": 0.5})
    with pytest.raises(CheckpointError, match="optimizer.lr"):
        Trainer(recipe(changed), tmp_path / "run")
    longer = tiny_recipe(tiny_corpus, train={"max_duration": "12ba"})  # extending training is allowed
    result = Trainer(recipe(longer), tmp_path / "run").fit()
    assert result.resumed_from.batch == 8 and result.timestamp.batch == 12


def test_load_path_starts_from_another_run(tmp_path, tiny_corpus):
    Trainer(recipe(tiny_recipe(tiny_corpus, train={"max_duration": "8ba"})), tmp_path / "base").fit()
    source = tmp_path / "base" / "checkpoints" / "ep0-ba8.pt"
    config = tiny_recipe(tiny_corpus, train={"max_duration": "8ba"}, checkpoint={"load_path": f"file://{source}"})
    trainer = Trainer(recipe(config), tmp_path / "fork")
    assert trainer.resumed_from.batch == 8
    assert_tree_equal(trainer.model.state_dict(), latest_payload(tmp_path / "base")["model"])


class ActivationDtypes(Callback):
    """Records the dtype of every Linear layer's output in the training forward passes."""

    def __init__(self):
        self.dtypes: set[torch.dtype] = set()

    def fit_start(self, state, logger):
        for module in state.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda _m, _i, output: self.dtypes.add(output.dtype))


def test_amp_bf16_trains_on_cpu(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "30ba", "precision": "amp_bf16"})
    seen = ActivationDtypes()
    Trainer(recipe(config), tmp_path / "run", callbacks=[seen]).fit()
    assert seen.dtypes == {torch.bfloat16}  # the matmuls really ran under bf16 autocast
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(loss) for _, loss in curve) and curve[-1][1] < curve[0][1] - 0.3
    fp32, seen32 = tiny_recipe(tiny_corpus, train={"max_duration": "30ba"}), ActivationDtypes()
    Trainer(recipe(fp32), tmp_path / "fp32", callbacks=[seen32]).fit()
    assert seen32.dtypes == {torch.float32}
    differences = [abs(a - b) for (_, a), (_, b) in zip(curve, losses(tmp_path / "fp32"))]
    assert max(differences) > 1e-5  # bf16 changes the numbers, not only the label (fp32 twice: 0 exactly)


def test_amp_fp16_needs_cuda(tmp_path, tiny_corpus):
    if torch.cuda.is_available():
        pytest.skip("CUDA present: amp_fp16 is allowed")
    with pytest.raises(RecipeError, match="amp_fp16"):
        Trainer(recipe(tiny_recipe(tiny_corpus, train={"precision": "amp_fp16"})), tmp_path / "run")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["amp_bf16", "amp_fp16"])
def test_mixed_precision_on_cuda(tmp_path, tiny_corpus, precision):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "30ba", "precision": precision, "device": "cuda"})
    Trainer(recipe(config), tmp_path / "run").fit()
    curve = losses(tmp_path / "run")
    assert all(math.isfinite(loss) for _, loss in curve) and curve[-1][1] < curve[0][1] - 0.3


def test_microbatch_must_divide_batch(tmp_path, tiny_corpus):
    with pytest.raises(RecipeError, match="microbatch_size"):
        Trainer(recipe(tiny_recipe(tiny_corpus, train={"microbatch_size": 3})), tmp_path / "run")


def test_deterministic_mode_repeats_exactly(tmp_path, tiny_corpus):
    config = tiny_recipe(tiny_corpus, train={"max_duration": "10ba", "deterministic": True}, model={"dropout": 0.2})
    Trainer(recipe(config), tmp_path / "a").fit()
    Trainer(recipe(config), tmp_path / "b").fit()
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert_tree_equal(latest_payload(tmp_path / "a")["model"], latest_payload(tmp_path / "b")["model"])
    torch.use_deterministic_algorithms(False)
