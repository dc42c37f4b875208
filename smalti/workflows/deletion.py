"""The steps of forgetting a provenance class: exact replay (G5) or structural ablation (G6), with a signed
certificate. ``smalti.workflows.forget.forget`` runs them (and ``smalti.workflows.lineage_deletion`` reuses them
across a lineage); each is public so that neither needs this module's private helpers.

**Plan.** The parent's ledger (verified first) says in which step a class
first contributed; the parent's checkpoints say where training can restart
before that step. Replaying from there costs ``steps after the fork`` out of
the run's steps; a class present from step 0 replays from the start.

**Exact.** The fork checkpoint is copied into a new run directory whose
recipe adds the class to ``data.exclude_classes``; the trainer resumes there.
Exclusion filters the data order (every other example keeps its place), so
the replay trains on exactly the batches a run that never had the class
trains on after the fork, and, the state at the fork being the same, ends
in the same weights (bitwise on CPU in deterministic mode). ``lineage.json``
tells the trainer to start a new ledger whose first entry links the parent's
signed tree head at the fork (``smalti.governance.lineage``).

**Ablate.** A class that an exclusive policy rule confines to its own
parameters (its adapter) has its parameters reset, to their initial values
or zero, and their optimizer state cleared; nothing else changes. The
ledger is the evidence: in no step did the class contribute to any other
layer, and no other class contributed to its layers. The honest limit: the
rest of the model saw the class's inputs in the forward pass (only its
gradients were confined), and what other classes' adapters learned from
shared representations is not undone.

**Certificate.** ``deletion-certificate.json``: class, mode, parent tree
head, fork step, checkpoint hash, steps replayed, hash of the final weights,
the new ledger's final head, held-out loss per class before and after;
signed (Ed25519) by the trainer key. ``smalti ledger verify`` checks it.
"""

from __future__ import annotations

import contextlib

import datetime as _dt
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from smalti import formats
from smalti.checkpoint import checkpoint_sha256, load_checkpoint, load_weights, weights_sha256
from smalti.core.class_losses import ClassLosses
from smalti.payload import read_payload
from smalti.errors import SmaltiError
from smalti.workflows.certificate import ledger_entries
from smalti.trust.keys import SigningKey
from smalti.governance.lineage import Link, run_entry, write_pending
from smalti.trust.entry import TreeHead
from smalti.governance.ledger.store import LedgerStore, ledger_path
from smalti.governance.ledger.verify import verify_ledger
from smalti.trust.taxonomy import Taxonomy, unknown_class
from smalti.software import software
from smalti.locks import RUN_LOCK, FolderLock

ABLATION_LIMIT = (
    "ablation removes what the class's gradients wrote into its confined parameters; the rest of the model "
    "never received its gradients (ledger evidence) but did process its inputs in the forward pass, so "
    "representations other classes learned on may still reflect it indirectly"
)


class DeletionError(SmaltiError):
    """A deletion that cannot be planned, run or certified."""


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class DeletionPlan:
    parent: Path
    node: str
    classes: list[str]  # the dataset classes the node covers
    total_steps: int
    first_step: int | None  # the first step with an example of the class; None: it never contributed
    fork_step: int  # restart after this many steps (0: from the initial weights)
    fork_checkpoint: Path | None
    ablation: str  # "possible: ..." or why not
    confined: list[str] = field(default_factory=list)  # parameters an exclusive rule gives the class

    @property
    def steps_to_replay(self) -> int:
        return 0 if self.first_step is None else self.total_steps - self.fork_step

    @property
    def cost_ratio(self) -> float:
        return self.steps_to_replay / max(1, self.total_steps)

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            parent=str(self.parent),
            fork_checkpoint=self.fork_checkpoint and self.fork_checkpoint.name,
            steps_to_replay=self.steps_to_replay,
            estimated_cost_vs_full_retrain=round(self.cost_ratio, 4),
        )
        return out


def _covered(node: str, signature: str) -> bool:
    return any(Taxonomy.covers(node, name) for name in signature.split("+"))


def plan_deletion(parent: str | Path, node: str) -> DeletionPlan:
    """What forgetting ``node`` from the run in ``parent`` takes, read from its verified ledger."""
    from smalti.checkpoint import CheckpointStore

    parent = Path(parent)
    if not ledger_path(parent).is_file():
        raise DeletionError(
            f"{parent}: no ledger.sqlite; only runs trained with governance.ledger can be forgotten from"
        )
    report = verify_ledger(parent)
    if not report.ok:
        raise DeletionError(f"{parent}: the ledger does not verify ({report.problem}); refusing to plan from it")
    genesis, steps, _ = ledger_entries(parent, tables=False)
    classes = [c for c in genesis["classes"] if Taxonomy.covers(node, c)]
    if not classes:
        raise DeletionError(unknown_class("--class", node, genesis["classes"]))
    first = next((e["step"] for e in steps if any(_covered(node, s) for s in e["examples"])), None)
    total = steps[-1]["step"] if steps else 0
    fork_step, fork_checkpoint = 0, None
    if first is not None:
        for path in CheckpointStore(parent / "checkpoints", keep=1).all():
            batch = int(path.name.split("-ba")[1].split(".")[0])
            if batch < first and batch >= fork_step:
                fork_step, fork_checkpoint = batch, path
    ablation, confined = _ablation(parent, node, genesis)
    return DeletionPlan(parent, node, classes, total, first, fork_step, fork_checkpoint, ablation, confined)


def _ablation(parent: Path, node: str, genesis: dict[str, Any]) -> tuple[str, list[str]]:
    """Whether an exclusive rule of the run's policy confines ``node``, and to which parameters."""
    from smalti.config import load_recipe
    from smalti.trust.policy import Policy

    recipe = load_recipe(parent / "recipe.yaml")
    if recipe.governance.policy is None:
        return "not possible: the run has no routing policy, so no exclusive rule confines the class", []
    from smalti.trust.keys import PublicKey as _Key

    taxonomy = (
        Taxonomy.load(recipe.data.taxonomy, _Key.load(recipe.data.trust))
        if recipe.data.taxonomy and recipe.data.trust
        else None
    )
    policy = (
        Policy.load(recipe.governance.policy, taxonomy)
        if taxonomy
        else Policy.parse(Path(recipe.governance.policy).read_bytes(), str(recipe.governance.policy))
    )
    recorded = genesis.get("fingerprints", {}).get("policy")
    if recorded and recorded != policy.fingerprint:
        raise DeletionError(
            f"{recipe.governance.policy}: not the policy the run was trained under (ledger: {recorded[:16]}...)"
        )
    names = list(load_payload(latest_checkpoint(parent))["model"])
    for rule, params in zip(policy.exclusive, policy.exclusive_parameters(names)):
        if any(Taxonomy.covers(c, node) for c in rule.classes):
            return (
                f"possible: exclusive rule for {', '.join(rule.classes)} confines it to {len(params)} parameters",
                sorted(params),
            )
    return f"not possible: no exclusive rule of policy {recipe.governance.policy} confines {node!r}", []


def load_payload(checkpoint: Path, tensors: bool = True) -> dict[str, Any]:
    """Through the one checkpoint reader: hash-checked, format-checked, unable to run code, and every field of
    the payload type-checked (``smalti.payload.read_payload``); the dict, which an ablation rewrites."""
    raw = load_checkpoint(checkpoint, tensors=tensors)
    read_payload(raw, str(checkpoint))
    return raw


def _close(data) -> None:
    for source in (data.train, data.val):
        getattr(source, "close", lambda: None)()


def latest_checkpoint(run: Path) -> Path:
    from smalti.checkpoint import CheckpointStore

    latest = CheckpointStore(run / "checkpoints", keep=1).latest()
    if latest is None:
        raise DeletionError(f"{run}: no checkpoint")
    return latest


# ---------------------------------------------------------------------------------------------- hashes


# ---------------------------------------------------------------------------------------------- evaluation


def loss_by_class(recipe_path: Path, checkpoint: Path | None, max_samples: int | None = None) -> dict[str, float]:
    """Held-out loss of every class (mean per target token) for the weights in ``checkpoint``."""
    return losses_by_class(recipe_path, [checkpoint], max_samples)[0]


@torch.inference_mode()  # no autograd bookkeeping at all (~10% faster than no_grad here)
def losses_by_class(
    recipe_path: Path, checkpoints: list[Path | dict[str, torch.Tensor] | None], max_samples: int | None = None
) -> list[dict[str, float]]:
    """``loss_by_class`` for several checkpoints (paths, or model state dicts already loaded; None: the
    initial weights) of one recipe, reading the held-out data once.

    ``max_samples``: held-out examples (default: the recipe's ``eval.max_samples``, what the trainer
    evaluates, so the numbers equal those it records). Shards are verified as they are read
    (``verify: lazy``): evaluation reads only the validation shards, and a bad one still fails closed.
    """
    from smalti.build import build_data, build_model_for
    from smalti.config import load_recipe
    from smalti.determinism import seed_everything
    from smalti.distributed import DistInfo
    from smalti.models.rows import set_rows

    recipe = load_recipe(recipe_path, ["data.verify=lazy"])
    seed_everything(recipe.seed)
    data = build_data(recipe, DistInfo())
    try:
        batches = list(data.eval_batches(recipe.eval.batch_size, max_samples or recipe.eval.max_samples))
        model = build_model_for(recipe, data)
        results = []
        for checkpoint in checkpoints:
            if checkpoint is not None:
                load_weights(
                    model,
                    checkpoint if isinstance(checkpoint, dict) else load_payload(checkpoint)["model"],
                    "the given weights" if isinstance(checkpoint, dict) else checkpoint,
                )
            model.eval()
            losses = ClassLosses(len(data.class_names))
            for batch in batches:
                set_rows(model, batch)
                losses.add(model, batch.provenance[:, 0], model(batch.inputs), batch.targets)
            results.append(losses.means(data.class_names))
    finally:
        _close(data)
    return results


def recorded_losses(payload: dict[str, Any]) -> dict[str, float] | None:
    """The per-class held-out losses the trainer recorded for this checkpoint's very weights, if it did.

    Training ends with an evaluation, then its final checkpoint: there ``evaluated_at`` is the
    checkpoint's own step. Any other checkpoint (or one written before per-class losses were
    recorded) has none, and the caller evaluates.
    """
    if payload.get("eval_by_class") and payload.get("evaluated_at") == payload["timestamp"]["batch"]:
        return dict(payload["eval_by_class"])
    return None


def evaluation(parent: Path, payloads: list[dict[str, Any]], max_samples: int | None) -> dict[str, Any]:
    """Held-out loss per class before and after: as the trainer recorded them at its final evaluations
    when both have them and no other sample count is asked for, else evaluated here on the same examples
    (the parent's recipe: evaluation keeps every class, whatever training excluded)."""
    recorded: Sequence[dict[str, float] | None] = [recorded_losses(payload) for payload in payloads]
    if max_samples is None and all(losses is not None for losses in recorded):
        source = "recorded by the trainer at its final evaluation"
    else:
        recorded = losses_by_class(parent / "recipe.yaml", [payload["model"] for payload in payloads], max_samples)
        source = "evaluated by smalti forget"
    samples = max_samples or payloads[0]["recipe"]["eval"]["max_samples"]  # the recipe the parent trained with
    return {"before": recorded[0], "after": recorded[-1], "max_samples": samples, "source": source}


# ---------------------------------------------------------------------------------------------- certificate


# ---------------------------------------------------------------------------------------------- forget


def _replay_link(
    plan: DeletionPlan, head: dict[str, Any], mode: str, start_weights: str, fork_step: int | None = None
) -> Link:
    """The link a deletion's run writes into its run entry: the parent, its head and key, what is left out."""
    store = LedgerStore(ledger_path(plan.parent))
    try:
        trainer_key = store.get_meta("trainer_public_key") or ""
    finally:
        store.close()
    return Link(
        kind="replay",
        run_dir=str(plan.parent.resolve()),
        head=head,
        trainer_key=trainer_key,
        start_weights_sha256=start_weights,
        fingerprints=run_entry(plan.parent).get("fingerprints", {}),
        fork_step=plan.fork_step if fork_step is None else fork_step,
        forgotten=plan.node,
        mode=mode,
    )


def base_certificate(plan: DeletionPlan, mode: str, parent_head: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": formats.DELETION_CERTIFICATE,
        "class": plan.node,
        "classes": plan.classes,
        "mode": mode,
        "parent": {"run_dir": str(plan.parent.resolve()), "head": parent_head},
        "first_contribution_step": plan.first_step,
        "fork_step": plan.fork_step,
        "full_retrain_steps": plan.total_steps,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "software": software(),
    }


def final_head(run: Path) -> dict[str, Any]:
    store = LedgerStore(ledger_path(run))
    try:
        heads = store.heads()
    finally:
        store.close()
    if not heads:
        raise DeletionError(f"{run}: the ledger has no signed tree head")
    return heads[-1].to_json()


def occupied(folder: Path) -> bool:
    """Whether ``folder`` holds anything but its lock (which a deletion writing into it holds itself)."""
    return folder.exists() and any(p.name != RUN_LOCK for p in folder.iterdir())


def prepare_out(out: Path) -> None:
    if occupied(out):
        raise DeletionError(f"--out {out}: exists and is not empty; name a new run directory")
    out.mkdir(parents=True, exist_ok=True)


def lock_for_deletion(stack: contextlib.ExitStack, parent: Path, node: str, out: Path) -> None:
    """Hold ``out`` (the one writer of the new run) and check no one is training ``parent`` meanwhile."""
    if occupied(out):
        raise DeletionError(f"--out {out}: exists and is not empty; name a new run directory")
    stack.enter_context(FolderLock(out / RUN_LOCK, f"forgetting {node} into {out}"))
    stack.enter_context(FolderLock(parent / RUN_LOCK, f"reading {parent} to forget {node}", shared=True))


def require_world_size(run: Path, payload: dict[str, Any], world_size: int) -> None:
    """A replay equals the counterfactual run bit for bit only at the world size the run trained at: the
    ranks' gradient sums are added in an order that depends on it. Refuse any other."""
    ranks = len(payload["rng"])  # every rank's random state, saved at each checkpoint
    if ranks != world_size:
        launch = (
            "in one process, without torchrun"
            if ranks == 1
            else (f"under torchrun at that world size: torchrun --nproc-per-node {ranks} -m smalti forget ...")
        )
        raise DeletionError(
            f"{run} trained on {ranks} rank{'s' if ranks > 1 else ''} and this is {world_size}; an "
            f"exact replay must run {launch}"
        )


def replay(
    plan: DeletionPlan, out: Path, key: SigningKey, parent_final: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Replay without the class from the fork, in this process; the certificate and the final checkpoint's payload."""
    fork_head, fork_hash = fork(plan, out, parent_final)
    train_without(plan.parent, plan.node, out)
    return replay_certificate(plan, out, fork_head, fork_hash)


def fork(plan: DeletionPlan, out: Path, parent_final: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Start ``out`` from the fork checkpoint (a copy: the parent stays untouched) with the lineage link the
    replay's ledger begins with; the signed head the replay links and the fork checkpoint's hash."""
    if plan.fork_checkpoint is None:  # the class was there from the first step: replay from the initial weights
        head, checkpoint_hash = parent_final, None
    else:
        fork = plan.fork_checkpoint
        head = load_payload(fork)["ledger"]["head"]
        (out / "checkpoints").mkdir()
        if fork.is_dir():  # a sharded checkpoint (FSDP2): its folder, hashed by its SHA256SUMS
            shutil.copytree(fork, out / "checkpoints" / fork.name)
        else:
            shutil.copy2(fork, out / "checkpoints" / fork.name)
        shutil.copy2(fork.with_name(fork.name + ".sha256"), out / "checkpoints" / (fork.name + ".sha256"))
        (out / "checkpoints" / "latest").write_text(fork.name + "\n")
        checkpoint_hash = checkpoint_sha256(fork)
    write_pending(out, _replay_link(plan, head, "exact", head.get("weights", "") if checkpoint_hash else ""))
    return head, checkpoint_hash


def train_without(parent: Path, node: str, out: Path) -> None:
    """Train ``out`` on, from its fork, with ``node`` left out of the data (on every rank under torchrun)."""
    from smalti.config import load_recipe
    from smalti.trainer import Trainer

    excluded = sorted(set(load_recipe(parent / "recipe.yaml").data.exclude_classes) | {node})
    # Shards are verified as the replay reads them (``lazy``): still fail-closed for every example it
    # trains on, without re-verifying the shards of classes the replay never reads.
    recipe = load_recipe(
        parent / "recipe.yaml", [f"data.exclude_classes={json.dumps(excluded)}", f"run_dir={out}", "data.verify=lazy"]
    )
    with Trainer(recipe, out) as trainer:
        trainer.fit()


def replay_certificate(
    plan: DeletionPlan, out: Path, fork_head: dict[str, Any], fork_hash: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    final = load_payload(latest_checkpoint(out))
    excluded = sorted(set(final["recipe"]["data"]["exclude_classes"]))
    certificate = base_certificate(plan, "exact", fork_head)
    certificate.update(
        checkpoint={"name": plan.fork_checkpoint.name, "sha256": fork_hash} if plan.fork_checkpoint else None,
        steps_replayed=plan.steps_to_replay,
        replayed_from_start=plan.fork_checkpoint is None,
        world_size=len(final["rng"]),
        counterfactual=f"smalti train RECIPE --set 'data.exclude_classes={json.dumps(excluded)}'",
        final_weights_sha256=weights_sha256(final["model"]),
        ledger_head=final_head(out),
    )
    return certificate, final


def ablation_evidence(run: Path, node: str, confined: list[str]) -> dict[str, Any]:
    """What the run's ledger shows about ``node`` and its confined parameters; refuses unless the class's
    gradient reached only the layers holding them and no other class's gradient reached those layers."""
    genesis, steps, _ = ledger_entries(run)
    layer_names = [layer["name"] for layer in genesis["layers"]]
    layer_of = {p: layer["name"] for layer in genesis["layers"] for p in layer["parameters"]}
    confined_layers = sorted({layer_of[p] for p in confined if p in layer_of})
    if not confined_layers:
        raise DeletionError(f"cannot ablate {node!r}: {run} has none of the parameters confining it; use --mode exact")
    touched, intruders, steps_with = set(), set(), []
    for entry in steps:
        for signature, cells in entry["contributions"].items():
            layers = {layer_names[cell[0]] for cell in cells}
            if _covered(node, signature):
                touched |= layers
                steps_with.append(entry["step"])
            elif layers & set(confined_layers):
                intruders.add(signature)
    outside = sorted(touched - set(confined_layers))
    if outside or intruders:
        raise DeletionError(
            f"cannot ablate {node!r}: {run}'s ledger shows its gradient in {', '.join(outside) or 'no other layer'} "
            f"and other classes in its layers ({', '.join(sorted(intruders)) or 'none'}); use --mode exact"
        )
    return {
        "layers_with_class_gradient": sorted(touched),
        "confined_layers": confined_layers,
        "steps_with_class_gradient": len(steps_with),
        "other_classes_in_confined_layers": [],
        "steps_checked": len(steps),
    }


def ablate(
    plan: DeletionPlan,
    out: Path,
    key: SigningKey,
    reset: str,
    parent_final: dict[str, Any],
    initial_from: Path | None = None,
    evidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Reset ``plan.confined`` in the parent's final weights. ``initial_from``: the run whose initial weights
    ``--reset initial`` restores (through a lineage: where the adapter was born); ``evidence``: the ledger
    checks, when the caller made them over a whole chain."""
    if reset not in ("initial", "zero"):
        raise DeletionError(f"--reset {reset!r}: choose initial or zero")
    evidence = evidence or ablation_evidence(plan.parent, plan.node, plan.confined)
    latest = latest_checkpoint(plan.parent)
    payload = load_payload(latest)
    model = _reset_confined(plan, payload, reset, initial_from)
    head = _ablation_ledger(plan, out, key, reset, parent_final, evidence, weights_sha256(model))
    payload["ledger"] = {"head": head, "recorder": payload["ledger"]["recorder"]} if payload.get("ledger") else None
    payload.update(eval_metrics={}, eval_by_class={}, evaluated_at=-1)  # the parent's numbers are not these weights'
    _write_ablated_run(plan.parent, out, latest, payload)
    certificate = base_certificate(plan, "ablate", parent_final)
    certificate.update(
        checkpoint={"name": latest.name, "sha256": checkpoint_sha256(latest)},
        steps_replayed=0,
        reset={"to": reset, "parameters": plan.confined},
        evidence=evidence,
        limits=ABLATION_LIMIT,
        final_weights_sha256=weights_sha256(model),
        ledger_head=head,
    )
    return certificate


def _initial_model(run: Path) -> torch.nn.Module:
    """The model a run's recipe builds before training (its seed, its surgery)."""
    from smalti.build import build_data, build_model_for
    from smalti.config import load_recipe
    from smalti.determinism import seed_everything
    from smalti.distributed import DistInfo

    recipe = load_recipe(run / "recipe.yaml")
    seed_everything(recipe.seed)
    data = build_data(recipe, DistInfo())
    try:
        return build_model_for(recipe, data)
    finally:
        _close(data)


def _reset_confined(
    plan: DeletionPlan, payload: dict[str, Any], reset: str, initial_from: Path | None
) -> dict[str, torch.Tensor]:
    """Reset the confined parameters in ``payload``'s weights, and clear their optimizer state (Adam's moments
    hold the class's gradients too); the weights."""
    from smalti.config import load_recipe
    from smalti.optimizers import optimizer_parameter_names, reset_optimizer_state

    built = _initial_model(plan.parent)  # the run's optimizer layout (and, by default, its initial weights)
    initial = (built if initial_from is None else _initial_model(initial_from)).state_dict()
    model = payload["model"]
    for confined in plan.confined:
        model[confined] = initial[confined].clone() if reset == "initial" else torch.zeros_like(model[confined])
    names = optimizer_parameter_names(built, load_recipe(plan.parent / "recipe.yaml").optimizer)
    for index, state in payload["optimizer"]["state"].items():
        # Keyed by position in the optimizer (a single-file checkpoint) or by name (a sharded one).
        name = (
            index if isinstance(index, str) else names[index] if isinstance(index, int) and index < len(names) else None
        )
        if name in plan.confined:
            reset_optimizer_state(state, model[name])
    return model


def _ablation_ledger(
    plan: DeletionPlan,
    out: Path,
    key: SigningKey,
    reset: str,
    parent_final: dict[str, Any],
    evidence: dict[str, Any],
    weights: str,
) -> dict[str, Any]:
    """The new run's ledger: one entry naming the parent head and what was reset, then a final signed head."""
    from smalti.config import load_recipe
    from smalti.trust import merkle
    from smalti.trust.entry import ZERO_HASH, encode_entry

    genesis = ledger_entries(plan.parent, tables=False)[0]
    link = _replay_link(plan, parent_final, "ablate", parent_final.get("weights", ""), fork_step=plan.total_steps)
    body = dict(
        genesis,
        parent=link.to_json(),
        ablation={"reset": reset, "parameters": plan.confined, "layers": evidence["confined_layers"]},
    )
    data_bytes = encode_entry(0, ZERO_HASH, body)
    leaf = merkle.leaf_hash(data_bytes)
    store = LedgerStore(ledger_path(out), create=True)
    try:
        origin = store.start_log(key.public, load_recipe(plan.parent / "recipe.yaml").governance.ledger.log_name)
        store.append([(0, 0, leaf, data_bytes)])
        head = TreeHead.signed(key, origin, 1, merkle.root([leaf]), final=True, weights=weights)
        store.add_head(head)
    finally:
        store.close()
    return head.to_json()


def _write_ablated_run(parent: Path, out: Path, latest: Path, payload: dict[str, Any]) -> None:
    """The ablated checkpoint (sharded if the parent's was: it resumes under FSDP2 at any world size) and the
    run files an auditor reads."""
    from smalti import sharded_checkpoint
    from smalti.checkpoint import CheckpointStore, checkpoint_name

    timestamp = payload["timestamp"]
    store, sharded = CheckpointStore(out / "checkpoints", keep=1), latest.is_dir()
    name = checkpoint_name(timestamp["epoch"], timestamp["batch"], sharded=sharded)
    if sharded:
        store.commit(sharded_checkpoint.save_whole(store.directory, name, payload), name)
    else:
        store.save(payload, name)
    shutil.copy2(parent / "recipe.yaml", out / "recipe.yaml")
    for extra in ("vocab.json", "data.json"):
        if (parent / extra).is_file():
            shutil.copy2(parent / extra, out / extra)
