"""Governance, as implementations of the step seam (``smalti.train.seam.StepSeam``).

- ``RoutedStep``: a routing policy (and algorithms' routing rules, such as layer freezing) decides per row of
  each microbatch which parameters may learn from it; gradients are routed, reduced once per step, and clipped
  per cell of parameters the same classes may update.
- ``LedgeredStep``: a ``RoutedStep`` whose every routing signature has its own backward pass, so that its
  gradient is its contribution; the ledger records each step and signs tree heads at checkpoints.

``governed_step`` is the seam factory ``smalti.trainer.Trainer`` hands the loop: it builds the plain seam, the
routed one or the ledgered one from the recipe, and admits a fine-tune's parent.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from smalti.checkpoint import weights_sha256
from smalti.config import RESUMABLE_CHANGES
from smalti.core.algorithm import Algorithm
from smalti.core.batch import Batch
from smalti.core.logger import Logger
from smalti.core.state import State
from smalti.distributed import DistInfo
from smalti.errors import CheckpointError, RecipeError
from smalti.governance.ledger.entropy import probe_batch
from smalti.governance.ledger.writer import Ledger
from smalti.governance.lineage import REPLAY_CHANGES, Link, admit_parent, fit_parent_weights, read_pending
from smalti.governance.routing import MicrobatchPlan, Router, routed_backward
from smalti.loggers.governance import GovernanceSignals
from smalti.train.seam import SeamContext, StepSeam
from smalti.trust.keys import PublicKey, SigningKey
from smalti.trust.policy import Policy, model_fingerprint


class RoutedStep(StepSeam):
    """Routing per class: the plan for each microbatch is made before its forward pass."""

    routes = True

    def __init__(self, router: Router, policy: Policy | None, dist: DistInfo) -> None:
        super().__init__(dist)
        self.router, self.policy = router, policy
        self.policy_fingerprint = policy.fingerprint if policy is not None else None
        self.plan: MicrobatchPlan | None = None

    @property
    def algorithm_view(self) -> Router:
        """What algorithms reach through ``State.governance`` (layer freezing freezes through it)."""
        return self.router

    def check(self, algorithms: Sequence[Algorithm], precision: str) -> None:
        unsafe = [a.name for a in algorithms if not a.routing_safe]
        if unsafe:
            raise RecipeError(
                f"algorithm {unsafe[0]} computes gradients outside the routed backward pass; "
                "it cannot run with a routing policy or the ledger on"
            )
        super().check(algorithms, precision)

    def start_step(self, loaded: Batch, batch: Batch, step: int) -> None:
        self.router.start_step()

    def microbatches(self, parts: list[Batch], step: int) -> list[Batch]:
        """A module routing cannot split by rows takes one routing signature at a time."""
        return [
            piece
            for part in parts
            for piece in (part.split_by_signature() if self.router.must_split(part.provenance, step) else (part,))
        ]

    def begin_microbatch(self, microbatch: Batch, step: int) -> None:
        self.plan = self.router.plan(microbatch.provenance, step)

    def backward(self, loss: torch.Tensor, microbatch: Batch) -> None:
        assert self.plan is not None
        if self.plan.input_indices:  # only routed parameters receive (or even compute) a gradient
            with self.router.guard_unrun_splits(self.plan):
                routed_backward(loss, self.plan)

    def end_microbatch(self) -> None:
        self.router.end_microbatch()
        self.plan = None

    def end_backward(self) -> None:
        self.router.synchronize()  # all ranks: the same routed gradients, the same updated parameters

    def extra_backward(self, loss_of: Callable[[], torch.Tensor], microbatch: Batch, step: int) -> None:
        """Routed by the same plan as the step's own pass over this microbatch; the ledger records only the
        gradient the update uses, so it is not told."""
        plan = self.router.plan(microbatch.provenance, step)
        try:
            loss = loss_of()
            if plan.input_indices:
                with self.router.guard_unrun_splits(plan):
                    routed_backward(loss, plan)
        finally:
            self.router.end_microbatch()

    def clip(self, max_norm: float, step: int) -> None:
        self.router.clip(max_norm, step)  # per cell: one class's gradients never change another cell's clipping

    def close(self) -> None:
        self.router.close()


class LedgeredStep(RoutedStep):
    """Routing, with one backward pass per routing signature and a signed ledger entry per step."""

    def __init__(
        self,
        router: Router,
        policy: Policy | None,
        dist: DistInfo,
        ledger_factory: Callable[[], Ledger],
        run_dir: Path,
        publish: Callable[[], None] | None,
        admitted: tuple[Link, dict[str, Any]] | None,
        layer_patterns: Sequence[str] = (),
    ) -> None:
        super().__init__(router, policy, dist)
        self._ledger_factory, self._publish = ledger_factory, publish
        self._layer_patterns = list(layer_patterns)  # the layers whose signals trackers show
        self._admitted = admitted
        self.pending = read_pending(run_dir)  # a deletion's replay: the link its new ledger begins with
        self.ledger: Ledger | None = None

    def open(self, model: torch.nn.Module) -> None:
        super().open(model)
        self.ledger = self._ledger_factory()

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        if self._admitted is None:
            return None
        weights = self._admitted[1]
        self._admitted = (self._admitted[0], {})  # the weights go into the model: do not hold a second copy
        return weights

    def _forked(self, payload: dict[str, Any]) -> bool:
        return self.pending is not None and (payload.get("ledger") or {}).get("head") == self.pending.head

    def resumable_changes(self, payload: dict[str, Any]) -> tuple[str, ...]:
        return REPLAY_CHANGES if self._forked(payload) else ()

    def start(self, payload: dict[str, Any] | None, where: str, same_run: bool) -> None:
        """A fresh ledger (naming a replay's or a fine-tune's parent), or this run's, continued from the
        checkpoint's signed head; a checkpoint of another run starts a new one."""
        assert self.ledger is not None
        if payload is None:
            parent = self.pending or (self._admitted[0] if self._admitted is not None else None)
            self.ledger.start(None, parent=parent.to_json() if parent else None)
            return
        saved = payload.get("ledger") if same_run else None
        if same_run and saved is None:
            raise CheckpointError(f"{where}: written without a ledger; use another --run-dir to record one")
        forked = same_run and self._forked(payload)
        assert not forked or self.pending is not None
        self.ledger.start(
            None if forked or not saved else saved["head"],
            parent=self.pending.to_json() if forked and self.pending else None,
        )
        if saved:
            self.ledger.load_state_dict(saved["recorder"])

    def attach_logger(self, logger: Logger, log_every: int) -> None:
        """Trackers receive the governance signals the ledger computes (``smalti.loggers.governance``)."""
        assert self.ledger is not None
        if not logger.wants_governance:
            return
        entropy = self.ledger.entropy
        self.ledger.listeners.append(
            GovernanceSignals(
                logger.log_governance,
                self.ledger.recorder.layer_names,
                self._layer_patterns,
                log_every,
                [p.start_batch for p in self.router.phases],
                entropy.layer_names if entropy is not None else (),
                entropy.class_names if entropy is not None else (),
            )
        )

    def checkpoint_record(self, final: bool, whole_weights: Callable[[], dict[str, torch.Tensor]]) -> Any:
        """The signed tree head (with the weights' digest) and the recorder's state; under FSDP2 both are
        collectives, and only rank 0 gets the record."""
        assert self.ledger is not None
        recorder = self.ledger.state_dict()
        whole = whole_weights()
        if not self.dist.is_main:
            return None
        return {"head": self.ledger.sign(final=final, weights=weights_sha256(whole)), "recorder": recorder}

    def after_checkpoint(self, record: Any) -> None:
        if record is not None and self._publish is not None:
            self._publish()

    def start_step(self, loaded: Batch, batch: Batch, step: int) -> None:
        assert self.ledger is not None
        self.ledger.start_step(loaded, batch)  # which examples the step trains on, which were dropped
        super().start_step(loaded, batch, step)

    def microbatches(self, parts: list[Batch], step: int) -> list[Batch]:
        """One routing signature per backward pass: its gradient is its contribution."""
        return [piece for part in parts for piece in part.split_by_signature()]

    def begin_microbatch(self, microbatch: Batch, step: int) -> None:
        super().begin_microbatch(microbatch, step)
        assert self.ledger is not None
        self.ledger.begin_microbatch(microbatch)  # a mixture of experts counts its tokens per class

    def end_microbatch(self) -> None:
        super().end_microbatch()
        if self.ledger is not None:
            self.ledger.end_microbatch()

    def backward(self, loss: torch.Tensor, microbatch: Batch) -> None:
        assert self.plan is not None and self.ledger is not None
        if self.plan.input_indices:  # this signature's gradient, kept apart
            with self.router.guard_unrun_splits(self.plan):
                self.ledger.backward(loss, self.plan, microbatch)

    def before_unscale(self, inverse_scale: float) -> None:
        assert self.ledger is not None
        self.ledger.gradient_statistics(inverse_scale)  # per-class, per-layer contributions to the final gradient

    def after_step(self, state: State, loss_sum: torch.Tensor, loss_units: torch.Tensor, skipped: bool) -> None:
        assert self.ledger is not None
        global_loss = self.global_mean_loss(loss_sum, loss_units)
        self.ledger.after_optimizer_step(
            state.timestamp.batch, state.timestamp.state_dict(), global_loss, self.router.step_updated, skipped
        )
        state.entropy_profile = self.ledger.last_entropy

    def close(self) -> None:
        super().close()
        if self.ledger is not None:
            self.ledger.close()


# ---------------------------------------------------------------------------------------------- the factory


def governed_step(context: SeamContext) -> StepSeam:
    """The seam the recipe asks for: plain, routed (a policy, or an algorithm's routing rules) or ledgered.
    Everything that can refuse (the policy, the key, a fine-tune's parent) is checked here, before the run
    directory is made."""
    recipe = context.recipe
    policy = _load_policy(context)
    rules = [rule for a in context.algorithms if hasattr(a, "routing_rules") for rule in a.routing_rules(context.model)]
    ledgered = recipe.governance.ledger.enabled
    if recipe.init.from_run is not None and context.starts_fresh and not ledgered:
        raise RecipeError("init.from_run needs governance.ledger: the run's first ledger entry names its parent")
    if policy is None and not rules and not ledgered:
        return StepSeam(context.dist)
    router = Router(context.model, context.data.class_names, policy, rules, context.state.batches_in, context.dist)
    if not ledgered:
        return RoutedStep(router, policy, context.dist)
    key = _ledger_key(context)
    admitted = _admit_parent(context, key) if recipe.init.from_run is not None and context.starts_fresh else None
    config = recipe.governance.ledger
    return LedgeredStep(
        router,
        policy,
        context.dist,
        lambda: _build_ledger(context, key, router, policy),
        context.run_dir,
        _publisher(context) if config.publish else None,
        admitted,
        recipe.logging.governance_layers,
    )


def _load_policy(context: SeamContext) -> Policy | None:
    path = context.recipe.governance.policy
    if path is None:
        return None
    taxonomy = context.data.taxonomy
    if taxonomy is None:
        raise RecipeError("governance.policy needs a prepared dataset with a taxonomy")
    policy = Policy.load(path, taxonomy)
    shapes = [(n, tuple(p.shape)) for n, p in context.model.named_parameters()]
    policy.check(taxonomy, [n for n, _ in shapes], model_fingerprint(shapes), str(path))
    return policy


def _ledger_key(context: SeamContext) -> SigningKey:
    """The trainer authority's key, which must be the one the taxonomy names (if it names one)."""
    config = context.recipe.governance.ledger
    if config.key is None:
        raise RecipeError("governance.ledger.enabled needs governance.ledger.key (the trainer authority's key)")
    key = SigningKey.load(config.key)
    taxonomy = context.data.taxonomy
    expected = taxonomy.key_of_role("trainer") if taxonomy is not None else None
    if taxonomy is not None and expected is not None and expected.key_id != key.public.key_id:
        raise RecipeError(
            f"governance.ledger.key ({config.key}): key {key.public.key_id} is not the trainer key "
            f"{expected.key_id} the taxonomy {taxonomy.name!r} names"
        )
    return key


def _admit_parent(context: SeamContext, key: SigningKey) -> tuple[Link, dict[str, Any]]:
    """Verify the parent's chain and final weights (``smalti.governance.lineage.admit_parent``). The trusted
    keys are ``init.trust`` if set, else the taxonomy's trainer and this run's own key."""
    config, data = context.recipe.init, context.data
    assert config.from_run is not None  # governed_step admits a parent only where init.from_run names one
    trusted = (
        [PublicKey.load(config.trust)]
        if config.trust is not None
        else [k for k in (data.taxonomy.key_of_role("trainer") if data.taxonomy else None, key.public) if k]
    )
    tokenizer = data.tokenizer.to_json() if data.tokenizer is not None else None
    link, weights = admit_parent(Path(config.from_run), trusted, tokenizer)
    fitted = fit_parent_weights(weights, list(context.model.state_dict()), f"init.from_run {config.from_run}")
    return link, fitted


def _build_ledger(context: SeamContext, key: SigningKey, router: Router, policy: Policy | None) -> Ledger:
    """The learning-dynamics ledger, signed with the trainer authority's key."""
    recipe, data = context.recipe, context.data
    config = recipe.governance.ledger
    fingerprints = {
        "policy": policy.fingerprint if policy else None,
        "taxonomy": data.provenance.get("taxonomy_fingerprint"),
        "dataset": data.fingerprint,
    }
    probe = probe_batch(data.val, config.probe_samples, len(data.class_names)) if config.entropy_every else None
    return Ledger(
        context.run_dir,
        key,
        router,
        list(data.class_names),
        fingerprints,
        probe=probe,
        entropy_every=config.entropy_every,
        probe_tokens=config.probe_tokens,
        flush_every=config.flush_every,
        dist=context.dist,
        recipe_fingerprint=recipe.fingerprint(ignore=RESUMABLE_CHANGES),
        log_name=config.log_name,
    )


def _publisher(context: SeamContext) -> Callable[[], None]:
    """Publish the ledger as tlog tiles up to the head just signed (main rank). The ledger in the run directory
    is the evidence and is already safe: a destination that fails costs a warning, and the next checkpoint's
    publication catches up."""
    from smalti.governance.ledger.tiles import publish  # fsspec's remote filesystems: only when publishing

    config = context.recipe.governance.ledger

    def publish_now() -> None:
        try:
            publish(context.run_dir, str(config.publish), config.publish_options, verify=False)
        except Exception as error:  # a network or server failure must not stop training
            print(
                f"smalti: warning: could not publish the ledger to {config.publish} ({error}); "
                "the next checkpoint tries again",
                file=sys.stderr,
            )

    return publish_now
