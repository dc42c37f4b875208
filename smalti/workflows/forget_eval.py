"""How much of a class a deletion removed, measured the way the unlearning literature measures it.

Three models: the parent (trained with the class), the forgotten one (``smalti forget``'s output), and
the counterfactual that never saw the class (exact forget's output is one, bitwise; or a retrain). On
the class's held-out examples and on every other class's:

1. **Forget quality** (TOFU): the class's held-out loss, and the two-sample Kolmogorov-Smirnov
   statistic and p-value between the forgotten and the counterfactual models' per-example losses
   (a high p-value: indistinguishable from never having seen it).
2. **Retained utility**: the held-out loss of every other class the parent trained on, against the parent and
   the counterfactual.
3. **Membership inference**: the AUC of a loss attack separating the class's training examples from
   its held-out ones (0.5: the model cannot tell them apart; a model that memorised reads higher).
4. **Relearning**: fine-tune on k examples of the class for a fixed budget and count the steps back
   to the parent's held-out loss; the counterfactual fine-tuned the same way is the floor.

Why a command and not only a benchmark: an auditor asks these questions of one deletion, with the
runs at hand; the study (``benchmarks/unlearning_study.py``, docs/deletion.md) runs it across methods.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalti.errors import SmaltiError
from smalti.trust.taxonomy import Taxonomy, unknown_class


class EvalError(SmaltiError):
    """Runs that cannot be compared, or a class they do not have."""


@dataclass
class Loaded:
    name: str
    model: torch.nn.Module


def _data_and_models(runs: dict[str, Path], recipe_run: Path):
    """The held-out and training data of ``recipe_run``'s recipe (every class kept), and each run's model."""
    from smalti.build import build_data, build_model_for
    from smalti.checkpoint import CheckpointStore, load_payload, load_weights
    from smalti.config import load_recipe
    from smalti.determinism import seed_everything
    from smalti.distributed import DistInfo

    recipe = load_recipe(recipe_run / "recipe.yaml", ["data.verify=lazy", "data.exclude_classes=[]"])
    seed_everything(recipe.seed)
    data = build_data(recipe, DistInfo())
    models = {}
    for name, run in runs.items():
        latest = CheckpointStore(run / "checkpoints", keep=1).latest()
        if latest is None:
            raise EvalError(f"{run}: no checkpoint")
        model = build_model_for(recipe, data)
        load_weights(model, load_payload(latest).model or {}, latest)
        model.eval()
        models[name] = model
    return recipe, data, models


@torch.inference_mode()
def example_losses(model: torch.nn.Module, source, indices: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Each example's mean token loss (the rows of ``source`` at ``indices``)."""
    from smalti.models.rows import set_rows

    out = []
    for start in range(0, len(indices), batch_size):
        batch = source.gather(indices[start : start + batch_size])
        set_rows(model, batch)
        # Module.__getattr__ types the model's loss methods as Tensor | Module
        out.append(model.example_losses(model(batch.inputs), batch.targets).double().cpu())  # type: ignore[operator]
    return torch.cat(out).numpy() if out else np.zeros(0)


def ks_test(forgotten: np.ndarray, counterfactual: np.ndarray):
    """TOFU's forget quality: the two-sample Kolmogorov-Smirnov test (scipy's, exact p-value for small samples)."""
    from scipy.stats import ks_2samp

    return ks_2samp(forgotten, counterfactual)


def membership_auc(members: np.ndarray, others: np.ndarray) -> float:
    """AUC of the loss attack (lower loss -> guessed a training member): P(member loss < other loss)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
    return float(roc_auc_score(labels, -np.r_[members, others]))


@torch.inference_mode()
def held_out_loss(model: torch.nn.Module, source, indices: torch.Tensor, batch_size: int = 64) -> float:
    """The mean loss per target token over ``indices``, summed by the trainer's own evaluation code (so the
    relearning curve's first point and the parent's target are the numbers its later points are)."""
    from smalti.core.class_losses import ClassLosses
    from smalti.models.rows import set_rows

    by_class = ClassLosses(int(source.classes.max()) + 1)
    for start in range(0, len(indices), batch_size):
        batch = source.gather(indices[start : start + batch_size])
        set_rows(model, batch)
        by_class.add(model, batch.provenance[:, 0], model(batch.inputs), batch.targets)
    loss, units = by_class.sums.sum(dim=1)
    return float(loss / units.clamp(min=1))


@dataclass(frozen=True)
class RelearningBudget:
    """What an attacker may spend: fixed, recorded, the same for every model compared."""

    steps: int
    lr: float
    max_examples: int  # the class's held-out examples evaluated after every step
    checkpoint_every: int | None = None  # steps between the relearning run's checkpoints (None: the last only)

    def batch(self, k: int) -> int:
        return min(8, k)


def relearning_recipe(run: Path, node: str, k: int, budget: RelearningBudget):
    """``run``'s recipe turned into the attack: start from its final weights (``init.from_run``, its ledger verified),
    train every weight (no routing policy binds an attacker) on k examples of ``node`` only, at a constant
    ``budget.lr``, evaluating ``node``'s held-out loss after every step."""
    from smalti.config import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    overrides: dict[str, Any] = {
        "run_dir": None,
        "init.from_run": str(run.resolve()),
        "init.trust": None,
        "algorithms": {},
        "governance.policy": None,
        "governance.ledger.entropy_every": 0,
        "governance.ledger.publish": None,
        "data.exclude_classes": [],
        "data.only_classes": [node],
        "data.late_classes": [],
        "data.deletable_late": False,
        "data.batching": "random",
        "data.train_examples": k,
        "data.verify": "lazy",
        "train.max_duration": f"{budget.steps}ba",
        "train.global_batch_size": budget.batch(k),
        "train.microbatch_size": None,
        "optimizer.lr": budget.lr,
        "optimizer.weight_decay": 0.0,
        "scheduler.name": "constant",
        "scheduler.warmup": "0ba",
        "eval.interval": "1ba",
        "eval.classes": [node],
        "eval.max_samples": budget.max_examples,
        "checkpoint.interval": f"{budget.checkpoint_every or budget.steps}ba",
        "checkpoint.keep": 1,
        "checkpoint.load_path": None,
        "checkpoint.before_late_classes": False,
        "checkpoint.autoresume": True,
        "logging.console": False,
        "logging.jsonl": True,
        "logging.mlflow": False,
    }
    if recipe.model.lora.classes:
        overrides["model.lora.freeze_base"] = False
    return load_recipe(run / "recipe.yaml", [f"{key}={json.dumps(value)}" for key, value in overrides.items()])


def relearning_run_dir(work: Path, run: Path, node: str, k: int, budget: RelearningBudget) -> Path:
    """One folder per (model, class, k, budget): the same attack on the same model is run once and reused (a
    counterfactual shared by several comparisons), and a killed attack resumes where it stopped."""
    key = json.dumps([str(run.resolve()), node, k, budget.steps, budget.lr, budget.max_examples])
    return work / f"{run.name}-k{k}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def relearn(
    run: Path, node: str, k: int, budget: RelearningBudget, work: Path, start_loss: float
) -> tuple[list[float], int | None]:
    """Fine-tune ``run`` on k examples of ``node`` as a Smalti run (checkpointed, ledgered, resumable). Returns the
    class's held-out loss before (``start_loss``) and after every step, read from the run's metrics, and the step
    the run resumed from (None: it started afresh)."""
    from smalti.trainer import Trainer

    directory = relearning_run_dir(work, run, node, k, budget)
    trainer = Trainer(relearning_recipe(run, node, k, budget), directory)
    resumed = trainer.resumed_from.batch if trainer.resumed_from is not None else None
    try:
        trainer.fit()
    finally:
        trainer.close()
    by_step: dict[int, float] = {}
    for line in (directory / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "eval/loss" in record:
            by_step[record["ba"]] = record["eval/loss"]
    missing = [step for step in range(1, budget.steps + 1) if step not in by_step]
    if missing:
        raise EvalError(f"{directory}: the relearning run logged no evaluation at step {missing[0]}")
    return [start_loss] + [by_step[step] for step in range(1, budget.steps + 1)], resumed


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step at which the held-out loss is at or below ``target`` (None: not within the budget)."""
    return next((step for step, loss in enumerate(curve) if loss <= target), None)


def _other_classes_losses(
    data: Any, models: dict[str, Any], parent: Path, covered: list[int], max_examples: int
) -> dict[str, dict[str, float]]:
    """Every other class the parent trained on: each model's mean held-out loss on it (retained utility)."""
    from smalti.config import load_recipe

    others = {}
    never_trained = load_recipe(parent / "recipe.yaml").data.exclude_classes  # the parent's own exclusions
    for index, name in enumerate(data.class_names):
        if index in covered or any(Taxonomy.covers(node_out, name) for node_out in never_trained):
            continue
        rows = data.eval_indices(max_examples, [name])
        if len(rows):
            others[name] = {run: round(float(example_losses(m, data.val, rows).mean()), 6) for run, m in models.items()}
    return others


def _relearning_attacks(
    runs: dict[str, Path],
    node: str,
    relearn_examples: tuple[int, ...],
    available: int,
    budget: RelearningBudget,
    work: Path,
    start: dict[str, float],
) -> list[dict[str, Any]]:
    """Fine-tune the forgotten model and the counterfactual on k examples of the class, for each k: how many
    steps each takes back to the parent's loss on it."""
    relearning = []
    for asked in relearn_examples:
        k = min(asked, available)  # a class with fewer training examples: all of them
        for run in ("forgotten", "counterfactual"):
            curve, _ = relearn(runs[run], node, k, budget, work, start[run])
            relearning.append(
                {
                    "model": run,
                    "examples": k,
                    "examples_asked": asked,
                    "steps_to_parent_loss": steps_to(curve, start["parent"]),
                    "run": str(relearning_run_dir(work, runs[run], node, k, budget)),
                    "curve": [round(x, 6) for x in curve],
                }
            )
    return relearning


def evaluate_forgetting(
    parent: Path,
    forgotten: Path,
    node: str,
    counterfactual: Path | None = None,
    relearn_examples: tuple[int, ...] = (16, 64, 256),
    relearn_steps: int = 50,
    relearn_lr: float | None = None,
    max_examples: int = 512,
    work: Path | None = None,
    checkpoint_every: int | None = None,
) -> dict[str, Any]:
    """The four measurements for forgetting ``node`` (a class or taxonomy node), parent vs forgotten vs
    counterfactual; see the module docstring. The relearning attacks are Smalti runs in ``work``
    (default: ``FORGOTTEN/forget-eval/relearning``)."""
    parent, forgotten = Path(parent), Path(forgotten)
    work = Path(work) if work is not None else forgotten / "forget-eval" / "relearning"
    counterfactual = Path(counterfactual) if counterfactual else _counterfactual_of(forgotten)
    runs = {"parent": parent, "forgotten": forgotten, "counterfactual": counterfactual}
    recipe, data, models = _data_and_models(runs, parent)
    try:
        covered = [i for i, c in enumerate(data.class_names) if Taxonomy.covers(node, c)]
        if not covered:
            raise EvalError(unknown_class("--class", node, data.class_names))
        generator = torch.Generator().manual_seed(recipe.seed)

        def of(source, classes: list[int]) -> torch.Tensor:
            rows = torch.isin(source.classes, torch.tensor(classes)).nonzero().squeeze(1)
            return rows[torch.randperm(len(rows), generator=generator)[:max_examples]].sort().values

        held, trained = data.eval_indices(max_examples, [node]), of(data.train, covered)
        if len(held) == 0 or len(trained) == 0:
            raise EvalError(f"--class {node}: no held-out or no training examples of it in {parent}'s data")
        losses = {name: example_losses(model, data.val, held) for name, model in models.items()}
        member = {name: example_losses(model, data.train, trained) for name, model in models.items()}
        test = ks_test(losses["forgotten"], losses["counterfactual"])
        others = _other_classes_losses(data, models, parent, covered, max_examples)
        utility = {run: float(np.mean([v[run] for v in others.values()])) if others else math.nan for run in models}
        start = {name: held_out_loss(model, data.val, held, recipe.eval.batch_size) for name, model in models.items()}
        target = start["parent"]
        budget = RelearningBudget(
            relearn_steps, relearn_lr if relearn_lr is not None else recipe.optimizer.lr, max_examples, checkpoint_every
        )
        available = int(torch.isin(data.train.classes, torch.tensor(covered)).sum())
        relearning = _relearning_attacks(runs, node, relearn_examples, available, budget, work, start)
        return {
            "class": node,
            "runs": {k: str(v) for k, v in runs.items()},
            "held_out_examples": len(held),
            "training_examples": len(trained),
            "forget_quality": {
                "loss_on_class": {run: round(float(v.mean()), 6) for run, v in losses.items()},
                "ks_statistic": round(float(test.statistic), 6),
                "ks_p_value": float(test.pvalue),
                "compared": "forgotten vs counterfactual per-example held-out losses (two-sample KS, as TOFU)",
            },
            "retained_utility": {
                "per_class": others,
                "mean": {k: round(v, 6) for k, v in utility.items()},
                "change_vs_parent": round(utility["forgotten"] - utility["parent"], 6),
                "change_vs_counterfactual": round(utility["forgotten"] - utility["counterfactual"], 6),
            },
            "membership_inference_auc": {run: round(membership_auc(member[run], losses[run]), 6) for run in models},
            "relearning": {
                "budget": {
                    "steps": budget.steps,
                    "lr": budget.lr,
                    "optimizer": recipe.optimizer.name
                    + ", no weight decay, constant learning rate, every weight trainable",
                    "batch": "min(8, k) of the k examples, cycled (a Smalti run each)",
                },
                "target": {"parent_loss_on_class": round(target, 6)},
                "runs": relearning,
            },
        }
    finally:
        for source in (data.train, data.val):
            getattr(source, "close", lambda: None)()


def _counterfactual_of(forgotten: Path) -> Path:
    """An exact forget's output is the counterfactual itself (bitwise the retrain); anything else needs one named."""
    import json

    from smalti.workflows.certificate import CERTIFICATE

    certificate = forgotten / CERTIFICATE
    if certificate.is_file() and json.loads(certificate.read_text()).get("mode") == "exact":
        return forgotten
    raise EvalError(
        f"{forgotten}: not an exact forget, so it is not its own counterfactual; pass --counterfactual "
        "RUN (an exact forget of the same class, or a run trained without it)"
    )


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss on the class against relearning steps, one line per model and k (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in result["relearning"]["runs"]:
        style = "-" if run["model"] == "forgotten" else "--"
        axis.plot(run["curve"], style, label=f"{run['model']}, k={run['examples']}")
    axis.axhline(result["relearning"]["target"]["parent_loss_on_class"], color="black", linewidth=0.8, label="parent")
    axis.set_xlabel("relearning steps")
    axis.set_ylabel(f"held-out loss on {result['class']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
