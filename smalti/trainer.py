"""The training loop, in one file, top to bottom.

Read ``Trainer.fit`` first: it is the loop of ``smalti.core.event.Event``
with the events fired where the docstring there says. Everything else in
this file is setup (``__init__``), one optimizer step (``_train_batch``),
evaluation, and checkpoints.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from smalti import distributed, sharded_checkpoint
from smalti import fsdp as fsdp_support
from smalti.algorithms import build_algorithms
from smalti.build import build_data, build_logger_destinations, build_model_for, resolve_device
from smalti import formats
from smalti.checkpoint import CheckpointStore, checkpoint_name, load_checkpoint, weights_sha256
from smalti.config import RESUMABLE_CHANGES, Recipe
from smalti.core.algorithm import Algorithm
from smalti.core.callback import Callback
from smalti.core.class_losses import ClassLosses
from smalti.core.engine import Engine
from smalti.core.event import Event
from smalti.core.state import State
from smalti.core.surgery import applied_surgery, apply_surgery
from smalti.core.time import Time, Timestamp
from smalti.core.batch import Batch
from smalti.data.lm import LanguageModelData
from smalti.determinism import capture_rng_state, configure_determinism, restore_rng_state, seed_everything
from smalti.errors import CheckpointError, RecipeError
from smalti.trust.keys import PublicKey, SigningKey
from smalti.governance.ledger.entropy import probe_batch
from smalti.governance.ledger.writer import Ledger
from smalti.governance.lineage import REPLAY_CHANGES, Link, admit_parent, fitted_weights, read_pending
from smalti.trust.policy import Policy, model_fingerprint
from smalti.governance.routing import Router, routed_backward
from smalti.io import atomic_write_bytes
from smalti.locks import RUN_LOCK, FolderLock, LockHeld
from smalti.core.logger import Logger
from smalti.models.adapters import set_row_classes
from smalti.optim import LRSchedule, build_optimizer
from smalti.precision import autocast, check_precision, grad_scaler


@dataclass
class FitResult:
    """What a finished ``fit`` reports (also printed as the run summary)."""

    run_dir: Path
    timestamp: Timestamp
    train_loss: float
    eval_metrics: dict[str, float]
    seconds: float
    tokens_per_second: float
    resumed_from: Timestamp | None
    checkpoint: Path | None
    parameters: int
    already_complete: bool = False  # the run had reached max_duration before: nothing was trained
    total_seconds: float = 0.0  # wall time of every session of the run, this one included


class Trainer:
    """Trains the model a recipe describes, resuming from the run directory if it can.

    ``model`` and ``data`` default to what the recipe builds; pass your own
    to train something else with the same loop (the model needs ``forward``,
    ``loss`` returning a *summed* loss, and ``loss_units``).
    """

    def __init__(
        self,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        model: torch.nn.Module | None = None,
        data: LanguageModelData | None = None,
        algorithms: Sequence[Algorithm] | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RecipeError(f"{self.run_dir}: the run directory is a file; name a directory")
        configure_determinism(recipe.train.deterministic)
        requested = recipe.train.device
        self.dist = distributed.init_distributed(distributed.device_type_for(requested))
        self.device = resolve_device(requested, self.dist)
        check_precision(recipe.train.precision, self.device)

        # Same seed on every rank for the data order and the initial weights...
        seed_everything(recipe.seed)
        self.data = data or build_data(recipe, self.dist)
        self.algorithms = list(build_algorithms(recipe.algorithms) if algorithms is None else algorithms)
        # Model surgery, in its fixed order, before anything else holds the parameters (smalti/core/surgery.py).
        self.model = apply_surgery(model or build_model_for(recipe, self.data, surgery=False),
                                   self.algorithms).to(self.device)
        # FSDP2 shards the model before anything holds its parameters (the optimizer, the router).
        self._fsdp = recipe.train.parallelism == "fsdp"
        self._owns_fsdp_group = self._fsdp and fsdp_support.process_group_for_fsdp(self.dist, self.device)
        if self._fsdp:
            fsdp_support.shard_model(self.model, self.device, recipe.train.fsdp)
        # ...then a per-rank stream for dropout and anything else random in the loop.
        seed_everything(recipe.seed + self.dist.rank)

        self.optimizer = build_optimizer(self.model, recipe.optimizer)
        self.schedule = LRSchedule(recipe.scheduler, recipe.optimizer.lr)
        self.scaler = grad_scaler(recipe.train.precision, self.device)
        self.microbatches_per_rank = self._microbatches_per_rank()
        self.log_every = Time.parse(recipe.logging.interval)
        self.eval_every = Time.parse(recipe.eval.interval)
        self.checkpoint_every = Time.parse(recipe.checkpoint.interval)

        self.state = State(
            model=self.model,
            optimizer=self.optimizer,
            max_duration=Time.parse(recipe.train.max_duration),
            data_shape=self.data.shape,
            device=self.device,
        )
        # Everything that can refuse the recipe (data, policy, algorithms, keys) is checked before the
        # run directory is made, so a refused run leaves nothing behind.
        self.policy, self.router = self._build_router()
        self.state.router = self.router
        if self._fsdp and self.router is not None:
            if recipe.train.fsdp.param_dtype != "fp32":
                raise RecipeError("train.fsdp.param_dtype bf16 cannot run with a routing policy or the ledger (they "
                                  "read each microbatch's fp32 gradients); use train.precision: amp_bf16 instead")
            # Governed: the router reduces once per step (smalti/fsdp.py). A routed backward pass stops below the
            # lowest parameter its examples may update, so ranks would all-gather different blocks in backward:
            # blocks stay gathered from forward to backward instead, and backward has no collective at all.
            self.model.set_requires_gradient_sync(False)
            self.model.set_reshard_after_forward(False)
        self._check_algorithms()
        ledger_key = self._ledger_key()
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", keep=recipe.checkpoint.keep)
        # A fine-tune's parent is admitted here too (not when resuming: the run already started from it).
        starts_fresh = not (recipe.checkpoint.autoresume and self.checkpoints.all())
        self._parent = self._admit_parent(ledger_key) if recipe.init.from_run is not None and starts_fresh else None
        self._lock = self._lock_run_dir()
        distributed.barrier(self.dist)
        self.logger = Logger(self.state, build_logger_destinations(recipe, self.run_dir, self.dist))
        self.engine = Engine(self.state, self.logger, self.algorithms, callbacks)
        self.ledger = self._build_ledger(ledger_key)
        # Deletion-aware training: a kept checkpoint just before the late classes begin in each epoch,
        # so forgetting one of them replays only the epoch's tail (None: no such checkpoint).
        late = self.data.first_late_batch() if recipe.checkpoint.before_late_classes else None
        self._late_starts_at = late if late else None

        # What runs the forward pass: DDP (if several processes) and torch.compile (if asked) wrap
        # the model; algorithms and checkpoints always see the plain module in ``state.model``.
        self._ddp: DistributedDataParallel | None = None
        self._forward_model: torch.nn.Module = self.model
        if self.dist.enabled and not self._fsdp:
            self._ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
            self._forward_model = self._ddp
        if recipe.train.compile:
            self._forward_model = torch.compile(self._forward_model)

        # Dedupe keys: an evaluation is per batch count (the weights), a checkpoint per timestamp.
        self._evaluated_at = -1
        self._checkpointed_at: Timestamp | None = None
        # What a summary reports, restored on resume: the checkpoint in use, the last logged training
        # loss and the wall time of every session of this run.
        self._last_checkpoint: Path | None = None
        # A sharded checkpoint being written in the background (checkpoint.async_save), over a gloo group of
        # its own so its coordination never interleaves with the training step's collectives.
        self._pending_save: tuple[sharded_checkpoint.PendingSave, str, bool] | None = None
        self._background_group = (torch.distributed.new_group(backend="gloo") if recipe.checkpoint.async_save
                                  else None)
        self._last_loss = float("nan")
        self._earlier_seconds = 0.0
        self._fit_started = time.perf_counter()
        self.engine.run(Event.INIT)
        self.resumed_from = self._resume()
        self._connect_trackers()
        if self.dist.is_main:
            self._write_run_files()

    def _connect_trackers(self) -> None:
        """Experiment trackers (TensorBoard, W&B) learn where a resumed run continues, and, with the ledger on,
        receive its governance signals at the logging interval (``smalti.loggers.governance``)."""
        from smalti.loggers.governance import GovernanceSignals
        from smalti.loggers.tracker import TrackerDestination

        for destination in self.logger.destinations:
            if isinstance(destination, TrackerDestination) and self.resumed_from is not None:
                destination.resumed_at(self.state.timestamp.batch)
        if self.ledger is None or not self.logger.wants_governance:
            return
        entropy = self.ledger.entropy
        self.ledger.listeners.append(GovernanceSignals(
            self.logger.log_governance, self.ledger.recorder.layer_names, self.recipe.logging.governance_layers,
            round(self.state.batches_in(self.log_every)), [p.start_batch for p in self.router.phases],
            entropy.layer_names if entropy is not None else (), entropy.class_names if entropy is not None else ()))

    def _build_router(self) -> tuple[Policy | None, Router | None]:
        """Routing is on when a policy is configured or an algorithm (layer freezing) adds rules."""
        policy = None
        if self.recipe.governance.policy is not None:
            taxonomy = self.data.taxonomy
            if taxonomy is None:
                raise RecipeError("governance.policy needs a prepared dataset with a taxonomy")
            policy = Policy.load(self.recipe.governance.policy, taxonomy)
            shapes = [(n, tuple(p.shape)) for n, p in self.model.named_parameters()]
            policy.check(taxonomy, [n for n, _ in shapes], model_fingerprint(shapes), str(self.recipe.governance.policy))
        rules = [rule for a in self.algorithms if hasattr(a, "routing_rules") for rule in a.routing_rules(self.model)]
        if policy is None and not rules and not self.recipe.governance.ledger.enabled:
            return None, None
        return policy, Router(self.model, self.data.class_names, policy, rules, self.state.batches_in, self.dist)

    def _check_algorithms(self) -> None:
        """Refuse combinations an algorithm declares it cannot honour, naming the algorithm."""
        if self.router is not None:
            unsafe = [a.name for a in self.algorithms if not a.routing_safe]
            if unsafe:
                raise RecipeError(f"algorithm {unsafe[0]} computes gradients outside the routed backward pass; "
                                  "it cannot run with a routing policy or the ledger on")
        if self.recipe.train.precision == "amp_fp16":
            scaled = [a.name for a in self.algorithms if a.needs_unscaled_gradients]
            if scaled:
                raise RecipeError(f"algorithm {scaled[0]} reads gradients, which amp_fp16 keeps loss-scaled "
                                  "until the step; use amp_bf16 or fp32")

    def _ledger_key(self) -> SigningKey | None:
        """The trainer authority's key (the taxonomy's, if it names one), or None without a ledger."""
        config = self.recipe.governance.ledger
        if not config.enabled:
            return None
        key = SigningKey.load(config.key)
        taxonomy = self.data.taxonomy
        expected = taxonomy.key_of_role("trainer") if taxonomy is not None else None
        if expected is not None and expected.key_id != key.public.key_id:
            raise RecipeError(
                f"governance.ledger.key ({config.key}): key {key.public.key_id} is not the trainer key "
                f"{expected.key_id} the taxonomy {taxonomy.name!r} names"
            )
        return key

    def _build_ledger(self, key: SigningKey | None) -> Ledger | None:
        """The learning-dynamics ledger, signed with the trainer authority's key."""
        if key is None:
            return None
        config = self.recipe.governance.ledger
        fingerprints = {
            "policy": self.policy.fingerprint if self.policy else None,
            "taxonomy": self.data.provenance.get("taxonomy_fingerprint"),
            "dataset": self.data.fingerprint,
        }
        probe = probe_batch(self.data.val, config.probe_samples, len(self.data.class_names)) if config.entropy_every else None
        return Ledger(
            self.run_dir, key, self.router, list(self.data.class_names), fingerprints, probe=probe,
            entropy_every=config.entropy_every, probe_tokens=config.probe_tokens, flush_every=config.flush_every, dist=self.dist,
            recipe_fingerprint=self.recipe.fingerprint(ignore=RESUMABLE_CHANGES), log_name=config.log_name,
        )

    def _lock_run_dir(self) -> FolderLock | None:
        """One writer per run directory: rank 0 holds its lock for the trainer's life (every rank of one torchrun
        job is that one writer); a second process, of this job or another, refuses in one line naming the holder."""
        lock, problem = None, None
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                lock = FolderLock(self.run_dir / RUN_LOCK, f"training into {self.run_dir}").acquire()
            except LockHeld as error:
                problem = error
        if distributed.all_reduce_max(1 if problem else 0, self.dist):
            raise problem or LockHeld(f"{self.run_dir}: in use by another process (rank 0 could not lock it)")
        return lock

    @property
    def run_lock(self) -> FolderLock | None:
        """The run directory's lock, on the main rank."""
        return self._lock

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the trainer opened: data readers, DDP, and a process group it created.

        The order matters: DDP's reducer must go while the process group is
        still registered, or its destructor tears the group down holding the
        GIL that gloo's worker thread needs (a deadlock at exit).
        """
        try:  # a checkpoint still being written is kept (Ctrl-C, an error in a later step)
            self._finish_save()
        except CheckpointError as error:
            print(f"smalti: {error}", file=sys.stderr)
        for source in (self.data.train, self.data.val):
            close = getattr(source, "close", None)
            if close is not None:
                close()
        if self.router is not None:
            self.router.close()
        if self.ledger is not None:
            self.ledger.close()
        self._ddp = None
        self._forward_model = self.model
        if self.dist.enabled:  # the reducer, in a reference cycle, must go before the group
            gc.collect()
        distributed.shutdown(self.dist)
        if self._owns_fsdp_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if getattr(self, "_lock", None) is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ the loop

    def fit(self) -> FitResult:
        state, engine = self.state, self.engine
        start_time, start_tokens = time.perf_counter(), state.timestamp.token
        self._fit_started = start_time
        if state.is_done:  # resumed at max_duration: report the run as recorded, change nothing
            return self._result(0.0, start_tokens, already_complete=True)
        self.logger.log_hyperparameters(self.recipe.to_dict())
        # Training mode for every module, whatever built the model: a transformers model loaded from a folder
        # arrives in eval mode (dropout off), and a resumed process must train as the uninterrupted one did.
        self.model.train()
        try:
            engine.run(Event.FIT_START)
            while not state.is_done:
                if state.timestamp.batch_in_epoch == 0:
                    engine.run(Event.EPOCH_START)
                batches = self.data.train_batches(
                    state.timestamp.epoch, state.timestamp.batch_in_epoch, self.dist.rank, self.dist.world_size
                )
                for batch in batches:
                    loss_sum, loss_units = self._train_batch(batch)
                    if state.due_at_batch_end(self.log_every) or state.is_done:
                        self._last_loss = self._global_mean_loss(loss_sum, loss_units)
                        self.logger.log_metrics(
                            {"train/loss": self._last_loss, "train/lr": self.optimizer.param_groups[0]["lr"]}
                        )
                    engine.run(Event.BATCH_END)
                    if self._pending_save is not None:
                        self._finish_save(wait=False)  # a background save that has ended becomes latest
                    if state.due_at_batch_end(self.eval_every) or state.is_done:
                        self.evaluate()
                    before_late = state.timestamp.batch_in_epoch == self._late_starts_at  # [deletion-aware]
                    if state.due_at_batch_end(self.checkpoint_every) or state.is_done or before_late:
                        self.save_checkpoint(Event.BATCH_CHECKPOINT, keep_always=before_late)
                    if state.is_done:
                        break
                else:
                    state.timestamp = state.timestamp.after_epoch()
                    engine.run(Event.EPOCH_END)
                    if state.due_at_epoch_end(self.eval_every) or state.is_done:
                        self.evaluate()
                    if state.due_at_epoch_end(self.checkpoint_every) or state.is_done:
                        self.save_checkpoint(Event.EPOCH_CHECKPOINT)
            engine.run(Event.FIT_END)
        finally:
            engine.close()
        return self._result(time.perf_counter() - start_time, start_tokens)

    def _result(self, seconds: float, start_tokens: int, already_complete: bool = False) -> FitResult:
        state = self.state
        return FitResult(
            run_dir=self.run_dir,
            timestamp=state.timestamp,
            train_loss=self._last_loss,
            eval_metrics=dict(state.eval_metrics),
            seconds=seconds,
            tokens_per_second=(state.timestamp.token - start_tokens) / seconds if seconds > 0 else 0.0,
            resumed_from=self.resumed_from,
            checkpoint=self._last_checkpoint,
            parameters=sum(p.numel() for p in self.model.parameters()),
            already_complete=already_complete,
            total_seconds=self._earlier_seconds + seconds,
        )

    def _train_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over this rank's share of a global batch.

        Returns this rank's summed loss and the global batch's loss units
        (their ratio, summed over ranks, is the batch's mean loss).
        """
        state, engine = self.state, self.engine
        if not self.model.training:  # whatever ran since the last step (an evaluation, a probe) put it back
            self.model.train()
        engine.run(Event.BATCH_START)
        self.schedule.apply(state)
        state.batch = loaded = batch.to(self.device)
        engine.run(Event.AFTER_DATALOADER)
        full_batch = state.batch
        ledger = self.ledger
        if ledger is not None:
            ledger.start_step(loaded, full_batch)  # which examples the step trains on, which were dropped

        # The loss of every microbatch is divided by the target count of the whole global batch,
        # so accumulated gradients equal one big batch's, whatever the microbatch split.
        loss_units = self.model.loss_units(full_batch.targets).to(torch.float32)
        loss_units = distributed.all_reduce_sum(loss_units, self.dist)
        scale = self.dist.world_size / loss_units  # DDP averages over ranks; undo that
        total_loss = torch.zeros((), device=self.device)
        router = self.router
        if router is not None:
            router.start_step()

        microbatches = full_batch.split(-(-full_batch.num_samples // self.microbatches_per_rank))
        if ledger is not None:  # one routing signature per backward pass: its gradient is its contribution
            microbatches = [part for microbatch in microbatches for part in microbatch.split_by_signature()]
        elif router is not None:  # [governance] a module routing cannot split by rows: one signature at a time
            microbatches = [part for microbatch in microbatches for part in (
                microbatch.split_by_signature() if router.must_split(microbatch.provenance, state.timestamp.batch)
                else (microbatch,))]
        if router is not None:  # only routing splits microbatches by signature, differently on each rank
            self._lockstep_forwards(len(microbatches), full_batch.select(slice(0, 1)))
        for index, microbatch in enumerate(microbatches):
            state.batch = microbatch
            is_last = index == len(microbatches) - 1
            with self._no_sync_unless(is_last):
                engine.run(Event.BEFORE_FORWARD)
                set_row_classes(self.model, state.batch.provenance)
                # [governance] decide which parameters may learn from each row of this microbatch
                plan = router.plan(state.batch.provenance, state.timestamp.batch) if router is not None else None
                try:
                    with autocast(self.recipe.train.precision, self.device):
                        state.outputs = self._forward_model(state.batch.inputs)
                    engine.run(Event.AFTER_FORWARD)
                    engine.run(Event.BEFORE_LOSS)
                    state.loss = self.model.loss(state.outputs, state.batch.targets)
                    engine.run(Event.AFTER_LOSS)
                    engine.run(Event.BEFORE_BACKWARD)
                    scaled = state.loss * scale
                    scaled = self.scaler.scale(scaled) if self.scaler else scaled
                    if plan is None:
                        scaled.backward()
                    elif ledger is not None and plan.input_indices:  # [ledger] this signature's gradient, kept apart
                        ledger.backward(scaled, plan, state.batch)
                    elif plan.input_indices:  # only routed parameters receive (or even compute) a gradient
                        routed_backward(scaled, plan)
                    engine.run(Event.AFTER_BACKWARD)
                finally:
                    if router is not None:
                        router.end_microbatch()
                        if self._fsdp:  # a pass with nothing to learn ran no backward: free what it gathered
                            fsdp_support.reshard_all(self.model)
            total_loss += state.loss.detach()
        state.batch, state.outputs, state.loss = full_batch, None, None
        if router is not None:
            router.synchronize()  # all ranks: the same routed gradients, the same updated parameters

        engine.run(Event.BEFORE_OPTIMIZER_STEP)
        if ledger is not None:  # [ledger] per-class, per-layer contributions to the final gradient
            ledger.gradient_statistics(1.0 / self.scaler.get_scale() if self.scaler is not None else 1.0)
        scale_before = self.scaler.get_scale() if self.scaler is not None else None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.recipe.train.grad_clip_norm is not None:
            if router is not None:  # per cell: one class's gradients never change another cell's clipping
                router.clip(self.recipe.train.grad_clip_norm, state.timestamp.batch)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.train.grad_clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        engine.run(Event.AFTER_OPTIMIZER_STEP)

        state.timestamp = state.timestamp.after_batch(
            samples=self.data.shape.global_batch_size, tokens=full_batch.num_tokens * self.dist.world_size
        )
        if ledger is not None:  # [ledger entry] for the step just taken
            skipped = self.scaler is not None and self.scaler.get_scale() < scale_before  # inf/nan: step skipped
            global_loss = distributed.all_reduce_sum(total_loss.clone(), self.dist) / loss_units
            ledger.after_optimizer_step(state.timestamp.batch, state.timestamp.state_dict(), global_loss,
                                        self.router.step_updated, skipped)
            state.entropy_profile = ledger.last_entropy
        return total_loss, loss_units

    def _global_mean_loss(self, local_loss_sum: torch.Tensor, loss_units: torch.Tensor) -> float:
        total = distributed.all_reduce_sum(local_loss_sum.clone(), self.dist)
        return float(total / loss_units)

    def _lockstep_forwards(self, count: int, sample: Batch) -> None:
        """Under FSDP2 every forward pass all-gathers, so every rank must run as many as the others. A routed
        step splits microbatches by signature, and ranks hold different classes: a rank with fewer passes
        runs the difference first, on one row without gradients, in eval mode (no dropout draws)."""
        if not (self._fsdp and self.dist.enabled):
            return
        missing = distributed.all_reduce_max(count, self.dist) - count
        if missing:
            was_training = self.model.training
            self.model.eval()
            set_row_classes(self.model, sample.provenance)  # per-class adapters need the row's class
            with torch.no_grad():
                for _ in range(missing):
                    self._forward_model(sample.inputs)
                    fsdp_support.reshard_all(self.model)  # as a backward pass would (blocks stay gathered otherwise)
            self.model.train(was_training)

    def _no_sync_unless(self, sync: bool) -> contextlib.AbstractContextManager:
        """Under DDP, all-reduce gradients only on the last microbatch of a step (never when routing:
        the router all-reduces the routed gradients itself); FSDP2 likewise reduce-scatters on the last one."""
        if self._fsdp:
            if self.router is None:
                self.model.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        if (sync and self.router is None) or self._ddp is None:
            return contextlib.nullcontext()
        return self._ddp.no_sync()

    def _microbatches_per_rank(self) -> int:
        per_rank = self.recipe.train.global_batch_size // self.dist.world_size
        size = self.recipe.train.microbatch_size or per_rank
        if per_rank % size:
            raise RecipeError(f"train.microbatch_size ({size}) must divide the per-process batch ({per_rank})")
        return per_rank // size

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss (and accuracy, for classifiers) over the recipe's fixed validation subset.

        Each class's mean loss goes to ``state.eval_by_class`` (and into checkpoints): a deletion
        certificate's before/after numbers are the final evaluations of the parent and the replay.
        """
        state = self.state
        if self._evaluated_at == state.timestamp.batch:
            return state.eval_metrics
        self.engine.run(Event.EVAL_START)
        was_training = self.model.training
        self.model.eval()
        classifier = hasattr(self.model, "accuracy_counts")
        by_class = ClassLosses(len(self.data.class_names), self.device)  # every row has a class: they sum to all
        correct = torch.zeros(1, dtype=torch.float64, device=self.device)
        batches = list(self.data.eval_batches(
            self.recipe.eval.batch_size, self.recipe.eval.max_samples, self.dist.rank, self.dist.world_size,
            self.recipe.eval.classes))
        if batches:
            self._lockstep_forwards(len(batches), batches[0].select(slice(0, 1)).to(self.device))
        for batch in batches:
            classes = batch.provenance[:, 0]
            batch = batch.to(self.device)
            set_row_classes(self.model, batch.provenance)
            with autocast(self.recipe.train.precision, self.device):
                logits = self.model(batch.inputs)
            by_class.add(self.model, classes, logits, batch.targets)
            if classifier:
                correct += self.model.accuracy_counts(logits, batch.targets).double()
        distributed.all_reduce_sum(by_class.sums, self.dist)
        self.model.train(was_training)
        state.eval_by_class = by_class.means(self.data.class_names)
        loss, units = by_class.sums.sum(dim=1)
        state.eval_metrics = {"eval/loss": float(loss / units.clamp(min=1))}
        if classifier:
            distributed.all_reduce_sum(correct, self.dist)
            state.eval_metrics["eval/accuracy"] = float(correct[0] / units.clamp(min=1))
        self.logger.log_metrics(state.eval_metrics)
        self.engine.run(Event.EVAL_END)
        self._evaluated_at = state.timestamp.batch
        return state.eval_metrics

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, event: Event, keep_always: bool = False) -> None:
        """Write the complete training state (main rank), then fire ``event``. ``keep_always``: never pruned."""
        state = self.state
        if self._checkpointed_at == state.timestamp:
            return
        rng_states = distributed.all_gather_object(capture_rng_state(), self.dist)
        # Under FSDP2 these are collectives: every rank takes part, rank 0 gets the results.
        recorder = self.ledger.state_dict() if self.ledger is not None else None
        whole = self._whole_weights() if self.ledger is not None else None
        weights = weights_sha256(whole) if whole is not None and self.dist.is_main else ""
        name = checkpoint_name(state.timestamp.epoch, state.timestamp.batch, sharded=self._fsdp)
        payload = None
        if self.dist.is_main:
            position = self.data.sampler.position(state.timestamp.epoch, state.timestamp.batch_in_epoch)
            payload = {
                "format": formats.CHECKPOINT,
                "recipe": self.recipe.to_dict(),
                "recipe_fingerprint": self.recipe.fingerprint(ignore=RESUMABLE_CHANGES),
                "timestamp": state.timestamp.state_dict(),
                "scheduler": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": rng_states,
                "sampler": self.data.sampler.state_dict(position),
                "tokenizer": self.data.tokenizer.to_json() if self.data.tokenizer is not None else None,
                "data": dict(self.data.provenance),
                "classes": list(self.data.class_names),
                "policy_fingerprint": self.policy.fingerprint if self.policy else None,
                "eval_metrics": dict(state.eval_metrics),
                "train_loss": self._last_loss,
                "wall_seconds": self._earlier_seconds + time.perf_counter() - self._fit_started,
                "eval_by_class": dict(state.eval_by_class),
                "evaluated_at": self._evaluated_at,
                "algorithms": {a.name: a.state_dict() for a in self.algorithms},
                "surgery": applied_surgery(self.model),
                "callbacks": {type(c).__name__: c.state_dict() for c in self.engine.callbacks},
                "ledger": None if self.ledger is None else {
                    "head": self.ledger.sign(final=state.is_done, weights=weights), "recorder": recorder},
            }
        if self._fsdp:  # every rank writes its shards (smalti/sharded_checkpoint.py); rank 0 commits
            self._finish_save()  # one background save at a time
            background = None if state.is_done else self._background_group  # the final one is waited for
            pending = sharded_checkpoint.save(self.checkpoints.directory, name, self.model, self.optimizer, payload,
                                              self.dist.is_main, lambda: distributed.barrier(self.dist), background)
            self._pending_save = (pending, name, keep_always)
            if background is None:
                self._finish_save()
        elif payload is not None:
            payload.update(model=self.model.state_dict(), optimizer=self.optimizer.state_dict())
            self._last_checkpoint = self.checkpoints.save(payload, name, keep_always=keep_always)
        if payload is not None and payload["ledger"] is not None and self.recipe.governance.ledger.publish:
            self._publish_ledger()
        distributed.barrier(self.dist)
        self._checkpointed_at = state.timestamp
        self.engine.run(event)

    def _publish_ledger(self) -> None:
        """Publish the ledger as tlog tiles up to the head just signed (main rank). The ledger in the run
        directory is the evidence and is already safe: a destination that fails costs a warning, and the
        next checkpoint's publication catches up."""
        from smalti.governance.ledger.tiles import publish

        config = self.recipe.governance.ledger
        try:
            publish(self.run_dir, str(config.publish), config.publish_options, verify=False)
        except Exception as error:  # a network or server failure must not stop training
            print(f"smalti: warning: could not publish the ledger to {config.publish} ({error}); "
                  "the next checkpoint tries again", file=sys.stderr)

    def _finish_save(self, wait: bool = True) -> None:
        """Commit the sharded checkpoint being written once every rank has written it (rank 0 moves ``latest``).

        ``wait=False``: only if it has ended; rank 0's write ends after every rank's (DCP gathers their
        results before it writes ``.metadata``), so rank 0 commits alone."""
        if self._pending_save is None:
            return
        pending, name, keep_always = self._pending_save
        if not wait and not pending.done():
            return
        pending.wait()
        self._pending_save = None
        if self.dist.is_main:
            self._last_checkpoint = self.checkpoints.commit(pending.seal(), name, keep_always=keep_always)

    def _whole_weights(self) -> dict[str, torch.Tensor]:
        """The model's whole weights (under FSDP2 gathered to rank 0's CPU: a collective; other ranks get {})."""
        if not self._fsdp:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _resume(self) -> Timestamp | None:
        """Autoresume from the run directory, else start from ``checkpoint.load_path`` if set."""
        config = self.recipe.checkpoint
        if self.dist.is_main:
            self.checkpoints.remove_partial_writes()
        # The newest checkpoint that loads: a damaged latest one costs the steps since the one before, and
        # the run still ends as it would have (every later step is replayed from that state).
        found = self.checkpoints.newest_intact(tensors=not self._fsdp) if config.autoresume else None
        latest = found[0] if found is not None else None
        if found is not None and found[2] and self.dist.is_main:
            print(f"smalti: {'; '.join(found[2])}; resuming from {latest.name}, the newest intact checkpoint",
                  file=sys.stderr)
        # A deletion's replay (``smalti forget``) starts from its parent's checkpoint, with a class excluded
        # and a new ledger that links the parent's tree head (``smalti.governance.lineage``).
        link = read_pending(self.run_dir)
        forked = False
        if found is not None:
            payload = found[1]
            forked = link is not None and (payload.get("ledger") or {}).get("head") == link.head
            self._check_same_recipe(payload, latest, also_allowed=REPLAY_CHANGES if forked else ())
        elif config.load_path:
            payload = load_checkpoint(config.load_path, tensors=not self._fsdp)
        else:
            # A fine-tune starts from its parent's final weights, and only those.
            inherited = self._load_parent_weights() if self._parent is not None else None
            if self.ledger is not None:
                parent = link or inherited
                self.ledger.start(None, parent=parent.to_json() if parent else None)
            return None
        where = latest or config.load_path
        # The data first (freshness, then the order): another release also changes the model it builds.
        recorded, current = (payload.get("data") or {}).get("manifest_version"), self.data.provenance.get("manifest_version")
        if latest is not None and recorded is not None and current is not None and current < recorded:
            raise CheckpointError(f"{where}: trained on release {recorded} of the dataset; {self.data.provenance['url']} "
                                  f"now holds release {current} (rolled back?)")
        try:
            position = self.data.sampler.check_resumable(payload["sampler"])
        except ValueError as error:
            hint = ("; to start from its weights only, with this run's own data, use --init-from its run "
                    "(init.from_run)" if latest is None else "")
            raise CheckpointError(f"{where}: {error}{hint}") from None
        # Keys never shape training (the order ignores them), but a run's evidence names one signed taxonomy
        # and policy: after a re-signing or a key rotation, continue from these weights as a new run.
        signed_then, signed_now = (payload.get("data") or {}).get("taxonomy_fingerprint"), self.data.provenance.get("taxonomy_fingerprint")
        if latest is not None and signed_then != signed_now:
            raise CheckpointError(
                f"{where}: trained under taxonomy {str(signed_then)[:12]}..., now {str(signed_now)[:12]}... (re-signed, or "
                f"keys rotated); a run's ledger names one signed taxonomy: continue in a new run directory with "
                f"--set checkpoint.load_path={where}")
        if payload.get("surgery", []) != applied_surgery(self.model):
            raise CheckpointError(f"{where}: written for a model with surgery {payload.get('surgery', [])}, "
                                  f"this one has {applied_surgery(self.model)}; use the same algorithms")
        if latest is not None and payload.get("policy_fingerprint") != (self.policy.fingerprint if self.policy else None):
            raise CheckpointError(f"{where}: trained under another routing policy (or none); use another --run-dir")
        try:
            if self._fsdp:  # every rank reads its own shards, resharded to this world size by DCP
                if not Path(str(where)).is_dir():
                    raise CheckpointError(f"{where}: a single-file checkpoint; a train.parallelism fsdp run loads "
                                          "sharded (.dcp) checkpoints (train it with ddp, or start a new run)")
                sharded_checkpoint.load_into(Path(str(where)), self.model, self.optimizer)
            else:
                self.model.load_state_dict(payload["model"])
                self.optimizer.load_state_dict(payload["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            reason = str(error).splitlines()[0]
            raise CheckpointError(f"{where}: does not fit this model/optimizer ({reason})") from None
        if self.scaler is not None and payload["scaler"] is not None:
            self.scaler.load_state_dict(payload["scaler"])
        timestamp = Timestamp.from_state_dict(payload["timestamp"])
        if position.epoch != timestamp.epoch:
            raise CheckpointError(f"{where}: sampler epoch {position.epoch} != timestamp epoch {timestamp.epoch}")
        self.state.timestamp = timestamp
        self.state.eval_metrics = dict(payload["eval_metrics"])
        self.state.eval_by_class = dict(payload.get("eval_by_class", {}))  # absent in checkpoints before it existed
        self._evaluated_at = int(payload["evaluated_at"])
        self._checkpointed_at = timestamp
        for algorithm in self.algorithms:
            algorithm.load_state_dict(payload["algorithms"].get(algorithm.name, {}))
        for callback in self.engine.callbacks:
            saved = payload["callbacks"].get(type(callback).__name__)
            if saved is not None:
                callback.load_state_dict(saved)
        if self.ledger is not None:  # continue this run's ledger; a checkpoint of another run starts a new one
            saved = payload.get("ledger") if latest is not None else None
            if latest is not None and saved is None:
                raise CheckpointError(f"{where}: written without a ledger; use another --run-dir to record one")
            self.ledger.start(None if forked or not saved else saved["head"], parent=link.to_json() if forked else None)
            if saved:
                self.ledger.load_state_dict(saved["recorder"])
        if latest is not None:
            self._last_checkpoint = latest if self.dist.is_main else None
            self._last_loss = float(payload.get("train_loss", float("nan")))
            self._earlier_seconds = float(payload.get("wall_seconds", 0.0))
        rng = payload["rng"]
        restore_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        return timestamp

    def _admit_parent(self, ledger_key: SigningKey | None) -> tuple[Link, dict[str, torch.Tensor]]:
        """Verify the parent's chain and final weights (``smalti.governance.lineage.admit_parent``).

        The link becomes this run's first ledger entry's ``parent``, so a fine-tune needs a ledger. The
        trusted keys are ``init.trust`` if set, else the taxonomy's trainer and this run's own key.
        """
        config = self.recipe.init
        if ledger_key is None:
            raise RecipeError("init.from_run needs governance.ledger: the run's first ledger entry names its parent")
        taxonomy = self.data.taxonomy
        trusted = [PublicKey.load(config.trust)] if config.trust is not None else [
            key for key in (taxonomy.key_of_role("trainer") if taxonomy else None, ledger_key.public) if key]
        tokenizer = self.data.tokenizer.to_json() if self.data.tokenizer is not None else None
        link, weights = admit_parent(Path(config.from_run), trusted, tokenizer)
        fitted, missing = fitted_weights(weights, list(self.model.state_dict()))
        new = [n for n in missing if ".lora_" not in n and ".adapters." not in n]  # only adapters may be new
        if new or len(fitted) < len(weights):
            extra = sorted(set(weights) - {n.replace(".base_layer.", ".") for n in fitted})
            raise CheckpointError(f"init.from_run {config.from_run}: the parent's weights do not fit this model "
                                  f"({'missing ' + new[0] if new else 'no place for ' + extra[0]}); only adapters may be new")
        return link, fitted

    def _load_parent_weights(self) -> Link:
        """Start from the admitted parent's final weights, and only those (a new optimizer, data order, ledger)."""
        assert self._parent is not None
        link, fitted = self._parent
        if self._fsdp:  # whole tensors (every rank has them) cut into this rank's shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, fitted, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.model.load_state_dict(fitted, strict=False)
        self._parent = None  # the weights are in the model now; do not hold a second copy
        return link

    def _check_same_recipe(self, payload: dict[str, Any], path: Path, also_allowed: tuple[str, ...] = ()) -> None:
        if payload["recipe_fingerprint"] == self.recipe.fingerprint(ignore=RESUMABLE_CHANGES):
            return
        allowed = RESUMABLE_CHANGES + also_allowed
        differences = _dict_differences(payload["recipe"], self.recipe.to_dict())
        changed = [key for key in differences if not any(key == r or key.startswith(r + ".") for r in allowed)]
        if not changed:
            return
        raise CheckpointError(
            f"{path}: this run directory was trained with a different recipe "
            f"(changed: {', '.join(changed) or 'unknown'}); use another --run-dir or restore the recipe"
        )

    def _write_run_files(self) -> None:
        """What an auditor needs to read the run: recipe, vocabulary, and where the data came from."""
        recipe_text = yaml.safe_dump(self.recipe.to_dict(), sort_keys=False)
        atomic_write_bytes(self.run_dir / "recipe.yaml", recipe_text.encode())
        if self.data.tokenizer is not None:
            atomic_write_bytes(self.run_dir / "vocab.json", self.data.tokenizer.to_json().encode())
        data = {**self.data.provenance, "fingerprint": self.data.fingerprint, "classes": self.data.class_names}
        atomic_write_bytes(self.run_dir / "data.json", (json.dumps(data, indent=1) + "\n").encode())
        methods = {"surgery": applied_surgery(self.model), "algorithms": [a.describe() for a in self.algorithms]}
        atomic_write_bytes(self.run_dir / "algorithms.json", (json.dumps(methods, indent=1) + "\n").encode())
        # The signed documents that governed the run, byte for byte with their signatures, so the run
        # directory alone answers an auditor (the ledger records their sha256: any swap shows).
        documents = {"taxonomy.yaml": self.recipe.data.taxonomy if self.data.taxonomy is not None else None,
                     "policy.yaml": self.recipe.governance.policy}
        for name, source in documents.items():
            for suffix in ("", ".sig") if source is not None else ():
                path = Path(f"{source}{suffix}")
                if path.is_file():
                    (self.run_dir / EVIDENCE).mkdir(exist_ok=True)
                    atomic_write_bytes(self.run_dir / EVIDENCE / f"{name}{suffix}", path.read_bytes())


EVIDENCE = "evidence"  # RUN_DIR/evidence/: copies of the signed taxonomy.yaml and policy.yaml (and .sig)


def _dict_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        found: list[str] = []
        for key in keys:
            found += _dict_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]
