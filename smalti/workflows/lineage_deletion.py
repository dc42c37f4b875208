"""Forgetting a class that an ancestor of a run learned: the deletion crosses the lineage.

A fine-tune inherits whatever its parent learned, so forgetting a class from the
fine-tune means forgetting it where it entered. The plan walks the chain
(``smalti.governance.lineage.chain``), finds the **origin**, the oldest run whose
ledger shows the class in a step, and then:

- **exact**: replays the origin without the class (``smalti.workflows.deletion``,
  bitwise equal to the origin trained without it), then trains every descendant
  again, in order, from its new parent (``init.from_run``), with its own recipe and
  the class excluded where its data has it. The new chain is the chain trained
  without the class: on CPU in deterministic mode, bitwise.
- **ablate**: where every run from the origin down to the child kept the class in
  parameters an exclusive rule of the origin's policy confines it to (its adapter),
  and no other class wrote into them in any of those runs, the child's final weights
  get those parameters reset. Nothing is retrained.

The new ancestors are written beside the new child, in ``OUT.lineage/`` (one run
directory each, numbered oldest first), because runs are evidence each: every one
has its own ledger whose first entry links its new parent. The certificate, signed
by the trainer key, names every link: each original run and its final tree head, and
what replaced it (run directory, final tree head, weights digest).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smalti.checkpoint import weights_sha256
from smalti.workflows.certificate import sign_certificate, write_certificate
from smalti.workflows.deletion import (
    DeletionError,
    DeletionPlan,
    ablate,
    base_certificate,
    evaluation,
    ablation_evidence,
    final_head,
    latest_checkpoint,
    load_payload,
    prepare_out,
    replay,
    occupied,
    plan_deletion,
    require_world_size,
)
from smalti.trust.keys import SigningKey
from smalti.governance.lineage import chain, run_entry, verify_chain
from smalti.trust.taxonomy import Taxonomy


@dataclass
class LineagePlan:
    """Which runs of a chain hold the class, oldest first: ``runs[0]`` is the origin, ``runs[-1]`` the child."""

    node: str
    runs: list[Path]
    origin: DeletionPlan  # the origin's own plan (where the class first contributed, its fork checkpoint)
    contributed: list[bool]  # per run: whether its ledger shows the class in a step

    @property
    def child(self) -> Path:
        return self.runs[-1]

    def describe(self) -> dict[str, Any]:
        return {
            "class": self.node,
            "origin": str(self.runs[0]),
            "origin_plan": self.origin.describe(),
            "runs": [{"run_dir": str(r), "contributed": c} for r, c in zip(self.runs, self.contributed)],
            "ablation": self.origin.ablation,
        }


def _contributed(run: Path, node: str) -> bool:
    """Whether the run's (verified) ledger shows ``node`` in any step; a run without the class never did."""
    classes = run_entry(run).get("classes", [])
    if not any(Taxonomy.covers(node, c) for c in classes):
        return False
    return plan_deletion(run, node).first_step is not None


def plan_through_lineage(child: str | Path, node: str) -> LineagePlan | None:
    """The lineage plan when an ancestor of ``child`` learned ``node``; None when only the child could have
    (forget the child alone) or it has no parent."""
    child = Path(child)
    ancestors = [parent for parent, _ in chain(child)]
    if not ancestors:
        return None
    problem = verify_chain(child)
    if problem is not None:
        raise DeletionError(f"{child}: its lineage does not verify ({problem}); refusing to plan from it")
    newest_first = [child, *ancestors]
    seen = [_contributed(run, node) for run in newest_first]
    if not any(seen[1:]):
        return None
    origin_index = max(i for i, s in enumerate(seen) if s)
    runs = list(reversed(newest_first[: origin_index + 1]))
    return LineagePlan(node, runs, plan_deletion(runs[0], node), list(reversed(seen[: origin_index + 1])))


def lineage_dir(out: Path) -> Path:
    return out.with_name(out.name + ".lineage")


def forget_through_lineage(
    plan: LineagePlan, out: Path, key: SigningKey, mode: str, reset: str, max_eval_samples: int | None
) -> dict[str, Any]:
    """Carry out ``plan`` into ``out`` (the new child) and ``OUT.lineage/``; returns the signed certificate."""
    for run in plan.runs:
        signer = final_head(run)["key_id"]
        if signer != key.public.key_id:
            raise DeletionError(
                f"the signing key {key.public.key_id} is not the trainer key {signer} of {run}, "
                f"a run this deletion replaces; every run of the chain from {plan.runs[0]} down "
                f"must be signed by the same trainer"
            )
    if mode == "exact":  # every run of the chain is trained again in this process
        for run in plan.runs:
            require_world_size(run, load_payload(latest_checkpoint(run), tensors=False), 1)
    child_final = final_head(plan.child)
    child_payload = load_payload(latest_checkpoint(plan.child))
    if mode == "ablate":
        certificate, final = (
            _ablate_through_lineage(plan, out, key, reset, child_final),
            load_payload(latest_checkpoint(out)),
        )
    elif mode == "exact":
        certificate, final = _replay_through_lineage(plan, out, key, child_final)
    else:
        raise DeletionError(f"--mode {mode!r}: choose exact or ablate")
    certificate["evaluation"] = evaluation(plan.child, [child_payload, final], max_eval_samples)
    write_certificate(out, sign_certificate(certificate, key))
    return certificate


def _excluding(run: Path, node: str) -> list[str]:
    """The run's recipe overrides that leave ``node`` out, where its data has it and it is not out already."""
    from smalti.config import load_recipe

    excluded = list(load_recipe(run / "recipe.yaml").data.exclude_classes)
    classes = run_entry(run).get("classes", [])
    has_it = any(Taxonomy.covers(node, c) for c in classes)
    already = any(Taxonomy.covers(e, node) for e in excluded)
    return [f"data.exclude_classes={json.dumps(sorted({*excluded, node}))}"] if has_it and not already else []


def _replacement(original: Path, new: Path, how: str, steps: int) -> dict[str, Any]:
    final = load_payload(latest_checkpoint(new))
    return {
        "original": {"run_dir": str(original.resolve()), "head": final_head(original)},
        "replacement": {
            "run_dir": str(new.resolve()),
            "ledger_head": final_head(new),
            "final_weights_sha256": weights_sha256(final["model"]),
        },
        "how": how,
        "steps": steps,
    }


def _replay_through_lineage(
    plan: LineagePlan, out: Path, key: SigningKey, child_final: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    from smalti.config import load_recipe
    from smalti.trainer import Trainer

    folder = lineage_dir(out)
    targets = [folder / f"{i}-{run.name}" for i, run in enumerate(plan.runs[:-1])] + [out]
    for target in targets:  # all refused up front: nothing is trained into a folder that is in use
        if occupied(target):
            raise DeletionError(f"{target}: exists and is not empty; name a new --out")
    prepare_out(targets[0])
    origin_certificate, _ = replay(plan.origin, targets[0], key, final_head(plan.runs[0]))
    links = [
        _replacement(
            plan.runs[0],
            targets[0],
            f"exact replay after step {plan.origin.fork_step}",
            origin_certificate["steps_replayed"],
        )
    ]
    for parent, run, target in zip(targets, plan.runs[1:], targets[1:]):
        overrides = [
            f"init.from_run={parent.resolve()}",
            f"run_dir={target}",
            "data.verify=lazy",
            *_excluding(run, plan.node),
        ]
        recipe = load_recipe(run / "recipe.yaml", overrides)
        prepare_out(target)
        with Trainer(recipe, target) as trainer:
            trainer.fit()
        steps = load_payload(latest_checkpoint(target))["timestamp"]["batch"]
        links.append(_replacement(run, target, "trained again from its new parent", steps))
    final = load_payload(latest_checkpoint(out))
    certificate = _chain_certificate(plan, "exact", child_final, links)
    certificate.update(
        steps_replayed=sum(link["steps"] for link in links),
        final_weights_sha256=weights_sha256(final["model"]),
        ledger_head=final_head(out),
        counterfactual=f"every run from {plan.runs[0]} down, trained with {plan.node} excluded",
    )
    return certificate, final


def _chain_certificate(
    plan: LineagePlan, mode: str, child_final: dict[str, Any], links: list[dict[str, Any]]
) -> dict[str, Any]:
    certificate = base_certificate(plan.origin, mode, child_final)
    certificate.update(
        parent={"run_dir": str(plan.child.resolve()), "head": child_final},
        origin=str(plan.runs[0].resolve()),
        lineage=links,
        full_retrain_steps=sum(plan_deletion(run, plan.node).total_steps for run in plan.runs),
    )
    return certificate


def _ablate_through_lineage(
    plan: LineagePlan, out: Path, key: SigningKey, reset: str, child_final: dict[str, Any]
) -> dict[str, Any]:
    """Reset the origin's confined parameters in the child's weights, after checking every run's ledger."""
    if not plan.origin.confined:
        raise DeletionError(
            f"cannot ablate {plan.node!r}: {plan.origin.ablation} (in {plan.runs[0]}, where it was "
            f"learned); use --mode exact"
        )
    # In every run since the origin: the class's gradient only in its parameters, no other class there.
    evidence = [ablation_evidence(run, plan.node, plan.origin.confined) for run in plan.runs]
    child_plan = DeletionPlan(
        plan.child,
        plan.node,
        plan.origin.classes,
        plan_deletion(plan.child, plan.node).total_steps,
        None,
        0,
        None,
        plan.origin.ablation,
        plan.origin.confined,
    )
    prepare_out(out)
    merged = {
        "confined_layers": sorted({layer for e in evidence for layer in e["confined_layers"]}),
        "layers_with_class_gradient": sorted({layer for e in evidence for layer in e["layers_with_class_gradient"]}),
        "steps_with_class_gradient": sum(e["steps_with_class_gradient"] for e in evidence),
        "other_classes_in_confined_layers": [],
        "steps_checked": sum(e["steps_checked"] for e in evidence),
    }
    certificate = ablate(child_plan, out, key, reset, child_final, initial_from=plan.runs[0], evidence=merged)
    certificate.update(
        origin=str(plan.runs[0].resolve()),
        lineage=[
            {
                "original": {"run_dir": str(run.resolve()), "head": final_head(run)},
                "how": "ledger checked: its gradient only in the confined parameters, no other class there",
                "steps": e["steps_checked"],
            }
            for run, e in zip(plan.runs, evidence)
        ],
    )
    return certificate
