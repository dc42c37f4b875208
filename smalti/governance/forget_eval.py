"""How much of a class a deletion removed, measured the way the unlearning literature measures it.

Three models: the parent (trained with the class), the forgotten one (``smalti forget``'s output), and
the counterfactual that never saw the class (exact forget's output is one, bitwise; or a retrain). On
the class's held-out examples and on every other class's:

1. **Forget quality** (TOFU): the class's held-out loss, and the two-sample Kolmogorov-Smirnov
   statistic and p-value between the forgotten and the counterfactual models' per-example losses
   (a high p-value: indistinguishable from never having seen it).
2. **Retained utility**: every other class's held-out loss, against the parent and the counterfactual.
3. **Membership inference**: the AUC of a loss attack separating the class's training examples from
   its held-out ones (0.5: the model cannot tell them apart; a model that memorised reads higher).
4. **Relearning**: fine-tune on k examples of the class for a fixed budget and count the steps back
   to the parent's held-out loss; the counterfactual fine-tuned the same way is the floor.

Why a command and not only a benchmark: an auditor asks these questions of one deletion, with the
runs at hand; the study (``benchmarks/unlearning_study.py``, docs/deletion.md) runs it across methods.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smalti.errors import SmaltiError


class EvalError(SmaltiError):
    """Runs that cannot be compared, or a class they do not have."""


@dataclass
class Loaded:
    name: str
    model: torch.nn.Module


def _data_and_models(runs: dict[str, Path], recipe_run: Path):
    """The held-out and training data of ``recipe_run``'s recipe (every class kept), and each run's model."""
    from smalti.build import build_data, build_model_for
    from smalti.checkpoint import CheckpointStore, load_checkpoint, load_weights
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
        load_weights(model, load_checkpoint(latest)["model"], latest)
        model.eval()
        models[name] = model
    return recipe, data, models


@torch.inference_mode()
def example_losses(model: torch.nn.Module, source, indices: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Each example's mean token loss (the rows of ``source`` at ``indices``)."""
    from smalti.models.adapters import set_row_classes

    out = []
    for start in range(0, len(indices), batch_size):
        batch = source.gather(indices[start:start + batch_size])
        set_row_classes(model, batch.provenance)
        out.append(model.example_losses(model(batch.inputs), batch.targets).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def membership_auc(members: np.ndarray, others: np.ndarray) -> float:
    """AUC of the loss attack (lower loss -> guessed a training member): P(member loss < other loss)."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.ones(len(members)), np.zeros(len(others))]
    return float(roc_auc_score(labels, -np.r_[members, others]))


def relearn(model: torch.nn.Module, source, train_indices: torch.Tensor, held_out, held_indices: torch.Tensor,
            steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """Fine-tune a copy on the examples at ``train_indices`` (cycled, ``batch_size`` at a time, AdamW at ``lr``)
    and return the class's held-out mean loss before and after every step."""
    from smalti.models.adapters import set_row_classes

    generator = torch.Generator().manual_seed(seed)
    learner = copy.deepcopy(model)
    optimizer = torch.optim.AdamW([p for p in learner.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    curve = [float(example_losses(learner, held_out, held_indices).mean())]
    order = train_indices[torch.randperm(len(train_indices), generator=generator)]
    for step in range(steps):
        picked = order[torch.arange(step * batch_size, (step + 1) * batch_size) % len(order)]
        batch = source.gather(picked)
        learner.train()
        set_row_classes(learner, batch.provenance)
        loss = learner.loss(learner(batch.inputs), batch.targets) / learner.loss_units(batch.targets).clamp(min=1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        learner.eval()
        curve.append(float(example_losses(learner, held_out, held_indices).mean()))
    return curve


def steps_to(curve: list[float], target: float) -> int | None:
    """The first step at which the held-out loss is at or below ``target`` (None: not within the budget)."""
    return next((step for step, loss in enumerate(curve) if loss <= target), None)


def evaluate_forgetting(parent: Path, forgotten: Path, node: str, counterfactual: Path | None = None,
                        relearn_examples: tuple[int, ...] = (16, 64, 256), relearn_steps: int = 50,
                        relearn_lr: float | None = None, max_examples: int = 512) -> dict[str, Any]:
    """The four measurements for forgetting ``node`` (a class or taxonomy node), parent vs forgotten vs
    counterfactual; see the module docstring."""
    from scipy.stats import ks_2samp

    from smalti.governance.taxonomy import Taxonomy, unknown_class

    parent, forgotten = Path(parent), Path(forgotten)
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

        held, trained = of(data.val, covered), of(data.train, covered)
        if len(held) == 0 or len(trained) == 0:
            raise EvalError(f"--class {node}: no held-out or no training examples of it in {parent}'s data")
        losses = {name: example_losses(model, data.val, held) for name, model in models.items()}
        member = {name: example_losses(model, data.train, trained) for name, model in models.items()}
        test = ks_2samp(losses["forgotten"], losses["counterfactual"])
        others = {}
        for index, name in enumerate(data.class_names):
            if index in covered:
                continue
            rows = of(data.val, [index])
            if len(rows):
                others[name] = {run: round(float(example_losses(m, data.val, rows).mean()), 6)
                                for run, m in models.items()}
        utility = {run: float(np.mean([v[run] for v in others.values()])) if others else math.nan for run in models}
        target = float(losses["parent"].mean())
        lr = relearn_lr if relearn_lr is not None else recipe.optimizer.lr
        relearning = []
        for k in relearn_examples:
            subset = trained[:k]
            for run in ("forgotten", "counterfactual"):
                curve = relearn(models[run], data.train, subset, data.val, held, relearn_steps, lr,
                                min(8, len(subset)), recipe.seed)
                relearning.append({"model": run, "examples": len(subset), "steps_to_parent_loss": steps_to(curve, target),
                                   "curve": [round(x, 6) for x in curve]})
        return {
            "class": node, "runs": {k: str(v) for k, v in runs.items()},
            "held_out_examples": len(held), "training_examples": len(trained),
            "forget_quality": {
                "loss_on_class": {run: round(float(v.mean()), 6) for run, v in losses.items()},
                "ks_statistic": round(float(test.statistic), 6), "ks_p_value": float(test.pvalue),
                "compared": "forgotten vs counterfactual per-example held-out losses (two-sample KS, as TOFU)"},
            "retained_utility": {"per_class": others, "mean": {k: round(v, 6) for k, v in utility.items()},
                                 "change_vs_parent": round(utility["forgotten"] - utility["parent"], 6),
                                 "change_vs_counterfactual": round(utility["forgotten"] - utility["counterfactual"], 6)},
            "membership_inference_auc": {run: round(membership_auc(member[run], losses[run]), 6) for run in models},
            "relearning": {"budget": {"steps": relearn_steps, "lr": lr, "optimizer": "AdamW, no weight decay",
                                      "batch": "min(8, k) of the k examples, cycled"},
                           "target": {"parent_loss_on_class": round(target, 6)}, "runs": relearning},
        }
    finally:
        for source in (data.train, data.val):
            getattr(source, "close", lambda: None)()


def _counterfactual_of(forgotten: Path) -> Path:
    """An exact forget's output is the counterfactual itself (bitwise the retrain); anything else needs one named."""
    import json

    from smalti.governance.certificate import CERTIFICATE

    certificate = forgotten / CERTIFICATE
    if certificate.is_file() and json.loads(certificate.read_text()).get("mode") == "exact":
        return forgotten
    raise EvalError(f"{forgotten}: not an exact forget, so it is not its own counterfactual; pass --counterfactual "
                    "RUN (an exact forget of the same class, or a run trained without it)")


def plot(result: dict[str, Any], path: Path) -> None:
    """Loss on the class against relearning steps, one line per model and k (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in result["relearning"]["runs"]:
        style = "-" if run["model"] == "forgotten" else "--"
        axis.plot(run["curve"], style, label=f"{run['model']}, k={run['examples']}")
    axis.axhline(result["relearning"]["target"]["parent_loss_on_class"], color="black", linewidth=0.8,
                 label="parent")
    axis.set_xlabel("relearning steps")
    axis.set_ylabel(f"held-out loss on {result['class']}")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
