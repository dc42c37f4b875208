"""forget_quality: the unlearning literature's measurements, across deletion methods and classes (issue 24's study).

Three plays of very different sizes are each forgotten, one at a time, by five methods:

- ``exact``: ``smalti forget --mode exact`` of a run trained without any policy (the counterfactual itself);
- ``ablate-adapter``: a run whose policy confines each studied class to its own gated adapter (hidden 32),
  then ``smalti forget --mode ablate``;
- ``ablate-wide``: the same with a wider exclusive region (an ERA-like expanded MLP slice per class, hidden 256);
- ``sgtm-slice``: an SGTM-like configuration: the same exclusive rules, but the slices are *ungated*
  (``model.adapters.gated: false``): every row runs through every slice, the class may update only its own,
  and no other class may update it; then ablated;
- ``gradient-ascent``: a reference Smalti does not offer as deletion: the plain run fine-tuned to *raise* its
  loss on the class's training examples for ``--ascent-steps`` steps (a Smalti run with the loss negated).

Each deletion is measured by ``smalti.workflows.forget_eval.evaluate_forgetting`` against its own counterfactual
(the exact forget of the same parent: the same architecture and policy, never having seen the class): forget
quality (the class's held-out loss; KS of per-example losses against the counterfactual, as TOFU), retained utility
(the other trained classes' loss, change against the parent), the loss-attack membership AUC, and relearning
attacks (k examples, a fixed budget; each a Smalti run). One JSON line per method and class; ``ratio``: the
method's wall time as a fraction of training the parent (a retrain costs about 1).

``--model hf`` runs the same study on the Hugging Face Llama of the other benchmarks with LoRA adapters
(r 8; wide: r 64 on every projection; sgtm: ungated r 8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from common import BABY_GPT, HF_LLAMA, Governed, emit, governed_shakespeare, machine, write_signed_policy

from smalti.config import Recipe
from smalti.core.algorithm import Algorithm
from smalti.core.event import Event
from smalti.workflows.deletion import plan_deletion
from smalti.workflows.forget import forget
from smalti.workflows.forget_eval import evaluate_forgetting
from smalti.trust.keys import SigningKey, write_key_pair
from smalti.trust.taxonomy import Taxonomy
from smalti.trainer import Trainer

# Three plays of very different sizes (characters: 14k, 88k, 174k), and two the models keep: about 470k characters,
# so that the default 1200 steps of 16 windows are 2.6 epochs (a class a model has seen once is barely learned).
STUDIED = ["gutenberg/poetry/lovers_complaint", "gutenberg/comedy/comedy_of_errors", "gutenberg/tragedy/hamlet"]
KEPT = ["gutenberg/romance/tempest", "gutenberg/comedy/midsummer_nights_dream"]
METHODS = ["exact", "ablate-adapter", "ablate-wide", "sgtm-slice", "gradient-ascent"]
# The policy-and-architecture arm each method's parent is trained under (exact and ascent share the plain one).
ARM_OF = {"exact": "plain", "gradient-ascent": "plain", "ablate-adapter": "adapter", "ablate-wide": "wide",
          "sgtm-slice": "sgtm"}


class NegatedLoss(Algorithm):
    """Gradient ascent: the loss the optimizer minimises is minus the model's (the reference, not a deletion)."""

    changes = frozenset({"loss"})

    def match(self, event: Event, state) -> bool:
        return event == Event.AFTER_LOSS

    def apply(self, event: Event, state, logger) -> None:
        state.loss = -state.loss


def adapters_for(arm: str, hf: bool) -> dict[str, Any]:
    if arm == "plain":
        return {}
    if hf:
        wide = arm == "wide"
        return {"lora": {"classes": STUDIED, "r": 64 if wide else 8, "alpha": 128 if wide else 16,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
                         if wide else ["q_proj", "v_proj"], "freeze_base": False, "gated": arm != "sgtm"}}
    return {"adapters": {"classes": STUDIED, "hidden": 256 if arm == "wide" else 32, "gated": arm != "sgtm"}}


def recipe(governed, arm: str, steps: int, key: Path, policy: Path, excluded: list[str], hf: bool) -> Recipe:
    model: dict[str, Any] = {"hf": {"config": dict(HF_LLAMA)}} if hf else dict(BABY_GPT)
    model.update(adapters_for(arm, hf))
    return Recipe.model_validate({
        "seed": 1,
        "model": model,
        "data": {"url": str(governed.dataset), "taxonomy": str(governed.taxonomy), "trust": str(governed.trust),
                 "batching": "per_class", "exclude_classes": excluded, "verify": "lazy",
                 **({"seq_len": 128} if hf else {})},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "scheduler": {"warmup": "10ba"},
        "train": {"max_duration": f"{steps}ba", "global_batch_size": 16, "microbatch_size": 8,
                  "grad_clip_norm": 1.0, "deterministic": True},
        "eval": {"interval": "1000000ba", "max_samples": 64},
        "checkpoint": {"interval": "1000000ba"},
        "logging": {"console": False, "jsonl": False},
        "governance": {"policy": str(policy) if arm != "plain" else None,
                       "ledger": {"enabled": True, "key": str(key), "entropy_every": 0, "flush_every": 100}},
    })


def fit(config: Recipe, run: Path, algorithms=None) -> None:
    trainer = Trainer(config, run, algorithms=algorithms)
    try:
        trainer.fit()
    finally:
        trainer.close()


def ascend(parent: Path, node: str, steps: int, out: Path) -> None:
    """The plain parent fine-tuned on the class's training examples with the loss negated (a Smalti run)."""
    from smalti.config import load_recipe

    overrides = {"init.from_run": str(parent.resolve()), "data.exclude_classes": [], "data.only_classes": [node],
                 "data.batching": "random", "train.max_duration": f"{steps}ba", "scheduler.name": "constant",
                 "scheduler.warmup": "0ba"}
    config = load_recipe(parent / "recipe.yaml", [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    fit(config, out, algorithms=[NegatedLoss()])


def summary(result: dict[str, Any], ks: list[int]) -> dict[str, Any]:
    quality, utility, mia = result["forget_quality"], result["retained_utility"], result["membership_inference_auc"]
    steps = {(r["model"], r["examples_asked"]): r["steps_to_parent_loss"] for r in result["relearning"]["runs"]}
    final = {(r["model"], r["examples_asked"]): r["curve"][-1] for r in result["relearning"]["runs"]}
    return {
        "loss_on_class": quality["loss_on_class"],
        "ks_statistic": quality["ks_statistic"], "ks_p_value": quality["ks_p_value"],
        "utility_change_vs_parent": utility["change_vs_parent"],
        "utility_change_vs_counterfactual": utility["change_vs_counterfactual"],
        "mia_auc": mia,
        "relearning_steps": {str(k): {"forgotten": steps.get(("forgotten", k)),
                                      "counterfactual": steps.get(("counterfactual", k))} for k in ks},
        "relearned_loss": {str(k): {"forgotten": final.get(("forgotten", k)),
                                    "counterfactual": final.get(("counterfactual", k))} for k in ks},
    }


def timed(record: Path, out: Path, make) -> float:
    """Seconds ``make()`` took to write ``out``, measured once and kept beside the runs (a rerun with --keep
    reuses both; NaN for a run kept without its time)."""
    if record.is_file():
        return json.loads(record.read_text())["seconds"]
    if out.exists():
        return float("nan")
    started = time.perf_counter()
    make()
    seconds = time.perf_counter() - started
    record.write_text(json.dumps({"seconds": seconds}))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt", "hf"], default="gpt")
    parser.add_argument("--steps", type=int, default=1200, help="training steps of every parent")
    parser.add_argument("--ascent-steps", type=int, default=20, help="gradient-ascent steps (the reference)")
    parser.add_argument("--relearn-examples", default="16,64,256")
    parser.add_argument("--relearn-steps", type=int, default=30)
    parser.add_argument("--max-examples", type=int, default=128, help="held-out and member examples per set")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--classes", default=",".join(STUDIED))
    parser.add_argument("--keep", help="a folder to keep the runs in (default: a temporary one)")
    args = parser.parse_args()
    hf, ks = args.model == "hf", [int(k) for k in args.relearn_examples.split(",")]
    methods, classes = args.methods.split(","), args.classes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if (root / "data" / "dataset" / "manifest.json").is_file():  # --keep: the runs are the data's
            data = root / "data"
            governed = Governed(data, data / "taxonomy.yaml", data / "keys" / "data-governance.pub", data / "dataset",
                                data / "keys" / "model-risk.key")
            key = root / "trainer-key" / "trainer.key"
        else:
            governed = governed_shakespeare(root / "data", seq_len=128 if hf else 64, bpe_vocab=2048 if hf else None)
            key, _ = write_key_pair("trainer", root / "trainer-key")
        nodes = list(Taxonomy.parse(governed.taxonomy.read_bytes(), str(governed.taxonomy)).classes)
        plays = [c for c in nodes if not any(other.startswith(c + "/") for other in nodes)]
        excluded = [c for c in plays if c not in STUDIED + KEPT]
        # Each studied class confined to its own adapter (which, exclusive, no other class may update).
        policy = write_signed_policy(governed, root / "policy.yaml", name="forget-quality",
                                     exclusive=[{"classes": [c], "params": ["@adapter"]} for c in STUDIED])
        train_s: dict[str, float] = {}
        for arm in sorted({ARM_OF[m] for m in methods}):
            run = root / f"parent-{arm}"
            train_s[arm] = timed(root / f"train-{arm}.json", run,
                                 lambda: fit(recipe(governed, arm, args.steps, key, policy, excluded, hf), run))
        signing_key = SigningKey.load(key)
        for node in classes:
            short = node.rsplit("/", 1)[-1]
            counterfactual: dict[str, tuple[Path, float]] = {}
            for arm in sorted({ARM_OF[m] for m in methods}):
                out = root / f"exact-{arm}-{short}"
                seconds = timed(root / f"cost-exact-{arm}-{short}.json", out,
                                lambda: forget(root / f"parent-{arm}", node, out, signing_key, "exact"))
                counterfactual[arm] = (out, seconds)
            for method in methods:
                arm = ARM_OF[method]
                parent = root / f"parent-{arm}"
                if method == "exact":
                    forgotten, seconds = counterfactual[arm]
                    plan = plan_deletion(parent, node)
                    steps_fraction = plan.steps_to_replay / plan.total_steps
                elif method == "gradient-ascent":
                    forgotten = root / f"ascent-{short}"
                    seconds = timed(root / f"cost-ascent-{short}.json", forgotten,
                                    lambda: ascend(parent, node, args.ascent_steps, forgotten))
                    steps_fraction = args.ascent_steps / args.steps
                else:
                    forgotten = root / f"ablate-{arm}-{short}"
                    seconds = timed(root / f"cost-ablate-{arm}-{short}.json", forgotten,
                                    lambda: forget(parent, node, forgotten, signing_key, "ablate"))
                    steps_fraction = 0.0
                result = evaluate_forgetting(parent, forgotten, node, counterfactual[arm][0], tuple(ks),
                                             args.relearn_steps, None, args.max_examples, root / "relearning")
                emit({
                    "benchmark": "forget_quality", "model": args.model, "method": method, "class": node,
                    "ratio": round(seconds / train_s[arm], 4),
                    "cost": {"seconds": round(seconds, 2), "parent_train_seconds": round(train_s[arm], 2),
                             "steps_fraction": round(steps_fraction, 4)},
                    "training_examples": result["training_examples"], "held_out_examples": result["held_out_examples"],
                    **summary(result, ks),
                    "relearning_budget": result["relearning"]["budget"],
                    "parent_steps": args.steps, "machine": machine(),
                })


if __name__ == "__main__":
    main()
