"""The training loop, in one file, top to bottom.

Read ``TrainingLoop.fit`` first: it is the loop of ``smalti.core.event.Event`` with the events fired where the
docstring there says. Everything else in this file is setup (``__init__``), one optimizer step
(``_train_batch``), evaluation, and checkpoints.

Nothing here knows about routing or the ledger: whatever governs a step does so through the step seam
(``smalti.train.seam.StepSeam``), and where the model runs (DDP, FSDP2) is ``smalti.train.placement``.
``smalti.trainer.Trainer`` is this loop with governance's seam plugged in.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml

from smalti import distributed, sharded_checkpoint
from smalti.algorithms import build_algorithms
from smalti.build import build_data, build_logger_destinations, build_model_for, resolve_device
from smalti.checkpoint import CheckpointStore, checkpoint_name, load_checkpoint
from smalti.config import RESUMABLE_CHANGES, Recipe
from smalti.core.algorithm import Algorithm
from smalti.core.batch import Batch
from smalti.core.callback import Callback
from smalti.core.class_losses import ClassLosses
from smalti.core.engine import Engine
from smalti.core.event import Event
from smalti.core.logger import Logger
from smalti.core.state import State
from smalti.core.surgery import applied_surgery, apply_surgery
from smalti.core.time import Time, Timestamp
from smalti.data.lm import LanguageModelData
from smalti.determinism import capture_rng_state, configure_determinism, restore_rng_state, seed_everything
from smalti.errors import CheckpointError, RecipeError
from smalti.io import atomic_write_bytes
from smalti.locks import RUN_LOCK, FolderLock, LockHeld
from smalti.models.rows import set_rows
from smalti.optim import LRSchedule
from smalti.optimizers import build_optimizer, evaluation_weights
from smalti.sophia import sampled_labels
from smalti.precision import autocast, check_precision, grad_scaler
from smalti.payload import Payload, read_payload
from smalti.train.placement import Placement
from smalti.train.seam import SeamContext, SeamFactory, StepSeam

EVIDENCE = "evidence"  # RUN_DIR/evidence/: copies of the signed taxonomy.yaml and policy.yaml (and .sig)


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


class TrainingLoop:
    """Trains the model a recipe describes, resuming from the run directory if it can.

    ``model`` and ``data`` default to what the recipe builds; pass your own to train something else with the
    same loop (the model needs ``forward``, ``loss`` returning a *summed* loss, and ``loss_units``).
    ``seam``: builds the step seam from the loop's parts (``smalti.train.seam``); plain training without it.
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
        seam: SeamFactory | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RecipeError(f"{self.run_dir}: the run directory is a file; name a directory")
        configure_determinism(recipe.train.deterministic)
        self.dist = distributed.init_distributed(distributed.device_type_for(recipe.train.device))
        self.device = resolve_device(recipe.train.device, self.dist)
        check_precision(recipe.train.precision, self.device)
        self._build_parts(model, data, algorithms)
        # Everything that can refuse the recipe (data, policy, algorithms, keys) is checked before the
        # run directory is made, so a refused run leaves nothing behind.
        self.checkpoints = CheckpointStore(self.run_dir / "checkpoints", keep=recipe.checkpoint.keep)
        self.seam = self._build_seam(seam)
        self._lock = self._lock_run_dir()
        distributed.barrier(self.dist)
        self.logger = Logger(self.state, build_logger_destinations(recipe, self.run_dir, self.dist))
        self.engine = Engine(self.state, self.logger, self.algorithms, callbacks)
        self.seam.open(self.model)
        # Deletion-aware training: a kept checkpoint just before the late classes begin in each epoch,
        # so forgetting one of them replays only the epoch's tail (None: no such checkpoint).
        late = self.data.first_late_batch() if recipe.checkpoint.before_late_classes else None
        self._late_starts_at = late if late else None
        self.placement.wrap()
        # Dedupe keys: an evaluation is per batch count (the weights), a checkpoint per timestamp.
        self._evaluated_at = -1
        self._checkpointed_at: Timestamp | None = None
        # What a summary reports, restored on resume: the checkpoint in use, the last logged training
        # loss and the wall time of every session of this run.
        self._last_checkpoint: Path | None = None
        # A sharded checkpoint being written in the background (checkpoint.async_save), over a gloo group of
        # its own so its coordination never interleaves with the training step's collectives.
        self._pending_save: tuple[sharded_checkpoint.PendingSave, str, bool] | None = None
        self._background_group = torch.distributed.new_group(backend="gloo") if recipe.checkpoint.async_save else None
        self._last_loss = float("nan")
        self._earlier_seconds = 0.0
        self._fit_started = time.perf_counter()
        self.engine.run(Event.INIT)
        self.resumed_from = self._resume()
        self._connect_trackers()
        if self.dist.is_main:
            self._write_run_files()

    def _build_parts(
        self, model: torch.nn.Module | None, data: LanguageModelData | None, algorithms: Sequence[Algorithm] | None
    ) -> None:
        """Data, algorithms, the model in place, and what steps it: nothing written to the run directory."""
        recipe = self.recipe
        # Same seed on every rank for the data order and the initial weights...
        seed_everything(recipe.seed)
        self.data = data or build_data(recipe, self.dist)
        self.algorithms = list(build_algorithms(recipe.algorithms) if algorithms is None else algorithms)
        # Model surgery, in its fixed order, before anything else holds the parameters (smalti/core/surgery.py).
        # Any module with ``loss`` (summed), ``loss_units`` and, for classifiers, ``accuracy_counts``.
        self.model: Any = apply_surgery(model or build_model_for(recipe, self.data, surgery=False), self.algorithms).to(
            self.device
        )
        # FSDP2 shards the model before anything holds its parameters (the optimizer, the seam).
        self.placement = Placement(self.model, recipe, self.dist, self.device)
        # ...then a per-rank stream for dropout and anything else random in the loop.
        seed_everything(recipe.seed + self.dist.rank)
        self.optimizer = build_optimizer(self.model, recipe.optimizer)
        if hasattr(self.optimizer, "update_hessian") and self.dist.world_size > 1:
            raise RecipeError(
                "optimizer.name sophia: its Hessian pass runs in one process for now; train it without torchrun"
            )
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

    def _build_seam(self, factory: SeamFactory | None) -> StepSeam:
        """The step seam, checked against the algorithms and the placement before anything is written."""
        starts_fresh = not (self.recipe.checkpoint.autoresume and self.checkpoints.all())
        context = SeamContext(
            self.recipe, self.run_dir, self.model, self.data, self.algorithms, self.state, self.dist, starts_fresh
        )
        seam = factory(context) if factory is not None else StepSeam(self.dist)
        self.state.governance = seam.algorithm_view
        if seam.routes:
            self.placement.adopt_routing()
        seam.check(self.algorithms, self.recipe.train.precision)
        return seam

    def _connect_trackers(self) -> None:
        """Experiment trackers (TensorBoard, W&B) learn where a resumed run continues, and receive the seam's
        signals (the ledger's governance signals) at the logging interval."""
        for destination in self.logger.destinations:
            resumed_at = getattr(destination, "resumed_at", None)
            if resumed_at is not None and self.resumed_from is not None:
                resumed_at(self.state.timestamp.batch)
        self.seam.attach_logger(self.logger, round(self.state.batches_in(self.log_every)))

    def _lock_run_dir(self) -> FolderLock | None:
        """One writer per run directory: rank 0 holds its lock for the loop's life (every rank of one torchrun
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

    def __enter__(self) -> "TrainingLoop":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the loop opened: a checkpoint being written, data readers, the seam, DDP and a process
        group it created (in that order: see ``Placement.close``), and the run directory's lock."""
        try:  # a checkpoint still being written is kept (Ctrl-C, an error in a later step)
            self._finish_save()
        except CheckpointError as error:
            print(f"smalti: {error}", file=sys.stderr)
        for source in (self.data.train, self.data.val):
            close = getattr(source, "close", None)
            if close is not None:
                close()
        self.seam.close()
        self.placement.close()
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()
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
                        self._last_loss = float(self.seam.global_mean_loss(loss_sum, loss_units))
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

        Returns this rank's summed loss and the global batch's loss units (their ratio, summed over ranks, is
        the batch's mean loss).
        """
        state, engine, seam = self.state, self.engine, self.seam
        if not self.model.training:  # whatever ran since the last step (an evaluation, a probe) put it back
            self.model.train()
        engine.run(Event.BATCH_START)
        self.schedule.apply(state)
        state.batch = loaded = batch.to(self.device)
        engine.run(Event.AFTER_DATALOADER)
        full_batch = state.batch
        seam.start_step(loaded, full_batch, state.timestamp.batch)  # which examples the step trains on

        # The loss of every microbatch is divided by the target count of the whole global batch,
        # so accumulated gradients equal one big batch's, whatever the microbatch split.
        loss_units = self.model.loss_units(full_batch.targets).to(torch.float32)
        loss_units = distributed.all_reduce_sum(loss_units, self.dist)
        scale = self.dist.world_size / loss_units  # DDP averages over ranks; undo that
        total_loss = self._forward_backward(full_batch, scale)
        hessian_due = getattr(self.optimizer, "hessian_due", None)
        if hessian_due is not None and hessian_due(state.timestamp.batch):
            self._sampled_label_pass(full_batch, scale, float(loss_units))

        engine.run(Event.BEFORE_OPTIMIZER_STEP)
        skipped = self._optimizer_step()
        engine.run(Event.AFTER_OPTIMIZER_STEP)

        state.timestamp = state.timestamp.after_batch(
            samples=self.data.shape.global_batch_size, tokens=full_batch.num_tokens * self.dist.world_size
        )
        seam.after_step(state, total_loss, loss_units, skipped)  # e.g. the ledger's entry for the step just taken
        return total_loss, loss_units

    def _forward_backward(self, full_batch: Batch, scale: torch.Tensor) -> torch.Tensor:
        """Every microbatch's forward and backward pass; the seam cuts them and runs each backward."""
        state, engine, seam, placement = self.state, self.engine, self.seam, self.placement
        step = state.timestamp.batch
        total_loss = torch.zeros((), device=self.device)
        microbatches = seam.microbatches(
            full_batch.split(-(-full_batch.num_samples // self.microbatches_per_rank)), step
        )
        if seam.routes:  # only a routing seam splits microbatches by signature, differently on each rank
            placement.lockstep_forwards(len(microbatches), full_batch.select(slice(0, 1)))
        for index, microbatch in enumerate(microbatches):
            state.batch = microbatch
            with placement.no_sync_unless(index == len(microbatches) - 1):
                engine.run(Event.BEFORE_FORWARD)
                set_rows(self.model, state.batch, step)
                seam.begin_microbatch(state.batch, step)  # e.g. which parameters may learn from each row
                try:
                    with autocast(self.recipe.train.precision, self.device):
                        state.outputs = placement.forward_model(state.batch.inputs)
                    engine.run(Event.AFTER_FORWARD)
                    engine.run(Event.BEFORE_LOSS)
                    state.loss = self.model.loss(state.outputs, state.batch.targets)
                    engine.run(Event.AFTER_LOSS)
                    engine.run(Event.BEFORE_BACKWARD)
                    scaled = state.loss * scale
                    seam.backward(self.scaler.scale(scaled) if self.scaler else scaled, state.batch)
                    engine.run(Event.AFTER_BACKWARD)
                finally:
                    seam.end_microbatch()
                    placement.after_microbatch()
            total_loss += state.loss.detach()
        state.batch, state.outputs, state.loss = full_batch, None, None
        seam.end_backward()  # e.g. all ranks: the same routed gradients, the same updated parameters
        return total_loss

    def _sampled_label_pass(self, full_batch: Batch, scale: torch.Tensor, batch_tokens: float) -> None:
        """Sophia's Hessian estimate (``smalti.sophia``): the step's examples once more, with labels the model
        samples from its own predictions, each microbatch through the seam's ``extra_backward`` (routed as the
        step's own pass was). The step's gradient is set aside meanwhile and put back untouched."""
        step = self.state.timestamp.batch
        parameters = list(self.model.parameters())
        kept = [p.grad for p in parameters]
        for p in parameters:
            p.grad = None
        generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step)  # the same after a resume
        parts = full_batch.split(-(-full_batch.num_samples // self.microbatches_per_rank))
        for microbatch in self.seam.microbatches(parts, step):

            def loss_of(microbatch: Batch = microbatch) -> torch.Tensor:
                set_rows(self.model, microbatch, step)
                with autocast(self.recipe.train.precision, self.device):
                    logits = self.placement.forward_model(microbatch.inputs)
                return self.model.loss(logits, sampled_labels(logits, microbatch.targets, generator)) * scale

            self.seam.extra_backward(loss_of, microbatch, step)
        self.optimizer.update_hessian(batch_tokens)
        for p, grad in zip(parameters, kept):
            p.grad = grad

    def _optimizer_step(self) -> bool:
        """Unscale, clip (through the seam) and step; whether the loss scaler skipped the step (inf/nan)."""
        scaler = self.scaler
        scale_before = scaler.get_scale() if scaler is not None else None
        self.seam.before_unscale(1.0 / scale_before if scale_before is not None else 1.0)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.recipe.train.grad_clip_norm is not None:
            self.seam.clip(self.recipe.train.grad_clip_norm, self.state.timestamp.batch)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return scaler is not None and scale_before is not None and scaler.get_scale() < scale_before

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
        with evaluation_weights(self.optimizer):  # schedule-free's averaged weights, the training ones back after
            return self._evaluate()

    def _evaluate(self) -> dict[str, float]:
        state = self.state
        self.engine.run(Event.EVAL_START)
        was_training = self.model.training
        self.model.eval()
        classifier = hasattr(self.model, "accuracy_counts")
        by_class = ClassLosses(len(self.data.class_names), self.device)  # every row has a class: they sum to all
        correct = torch.zeros(1, dtype=torch.float64, device=self.device)
        batches = list(
            self.data.eval_batches(
                self.recipe.eval.batch_size,
                self.recipe.eval.max_samples,
                self.dist.rank,
                self.dist.world_size,
                self.recipe.eval.classes,
            )
        )
        if batches:
            self.placement.lockstep_forwards(len(batches), batches[0].select(slice(0, 1)).to(self.device))
        for batch in batches:
            classes = batch.provenance[:, 0]
            batch = batch.to(self.device)
            set_rows(self.model, batch)
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
        # Under FSDP2 the seam's record may hold collectives: every rank takes part, rank 0 gets the results.
        record = self.seam.checkpoint_record(state.is_done, self.placement.whole_weights)
        name = checkpoint_name(state.timestamp.epoch, state.timestamp.batch, sharded=self.placement.fsdp)
        payload = self._payload(rng_states, record) if self.dist.is_main else None
        if self.placement.fsdp:  # every rank writes its shards (smalti/sharded_checkpoint.py); rank 0 commits
            self._finish_save()  # one background save at a time
            background = None if state.is_done else self._background_group  # the final one is waited for
            pending = sharded_checkpoint.save(
                self.checkpoints.directory,
                name,
                self.model,
                self.optimizer,
                payload.to_dict() if payload is not None else None,
                self.dist.is_main,
                lambda: distributed.barrier(self.dist),
                background,
            )
            self._pending_save = (pending, name, keep_always)
            if background is None:
                self._finish_save()
        elif payload is not None:
            whole = payload.to_dict() | {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            self._last_checkpoint = self.checkpoints.save(whole, name, keep_always=keep_always)
        if payload is not None:
            self.seam.after_checkpoint(record)  # e.g. publish the ledger up to the head just signed
        distributed.barrier(self.dist)
        self._checkpointed_at = state.timestamp
        self.engine.run(event)

    def _payload(self, rng_states: list[Any], governance: Any) -> Payload:
        """Everything but the tensors, as ``smalti.train.payload`` types it (main rank)."""
        state = self.state
        position = self.data.sampler.position(state.timestamp.epoch, state.timestamp.batch_in_epoch)
        return Payload(
            recipe=self.recipe.to_dict(),
            recipe_fingerprint=self.recipe.fingerprint(ignore=RESUMABLE_CHANGES),
            timestamp=state.timestamp.state_dict(),
            scheduler=self.schedule.state_dict(),
            scaler=self.scaler.state_dict() if self.scaler is not None else None,
            rng=rng_states,
            sampler=self.data.sampler.state_dict(position),
            tokenizer=self.data.tokenizer.to_json() if self.data.tokenizer is not None else None,
            data=dict(self.data.provenance),
            classes=list(self.data.class_names),
            policy_fingerprint=self.seam.policy_fingerprint,
            eval_metrics=dict(state.eval_metrics),
            train_loss=self._last_loss,
            wall_seconds=self._earlier_seconds + time.perf_counter() - self._fit_started,
            eval_by_class=dict(state.eval_by_class),
            evaluated_at=self._evaluated_at,
            algorithms={a.name: a.state_dict() for a in self.algorithms},
            surgery=applied_surgery(self.model),
            callbacks={type(c).__name__: c.state_dict() for c in self.engine.callbacks},
            ledger=governance,
        )

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

    def _resume(self) -> Timestamp | None:
        """Autoresume from the run directory, else start from ``checkpoint.load_path`` if set."""
        config = self.recipe.checkpoint
        if self.dist.is_main:
            self.checkpoints.remove_partial_writes()
        # The newest checkpoint that loads: a damaged latest one costs the steps since the one before, and
        # the run still ends as it would have (every later step is replayed from that state).
        found = self.checkpoints.newest_intact(tensors=not self.placement.fsdp) if config.autoresume else None
        latest = found[0] if found is not None else None
        if found is not None and found[2] and self.dist.is_main:
            print(
                f"smalti: {'; '.join(found[2])}; resuming from {found[0].name}, the newest intact checkpoint",
                file=sys.stderr,
            )
        if found is not None:
            raw = found[1]
            self._check_same_recipe(raw, found[0], also_allowed=self.seam.resumable_changes(raw))
        elif config.load_path:
            raw = load_checkpoint(config.load_path, tensors=not self.placement.fsdp)
        else:  # a fresh run; a fine-tune starts from its parent's final weights, and only those
            initial = self.seam.initial_weights()
            if initial is not None:
                self.placement.load_whole_weights(initial)
            self.seam.start(None, str(self.run_dir), same_run=False)
            return None
        where = str(latest or config.load_path)
        payload = read_payload(raw, where)
        position = self._check_resumable(payload, where, same_run=latest is not None)
        self._load_training_state(payload, raw, where)
        timestamp = Timestamp.from_state_dict(payload.timestamp)
        if position.epoch != timestamp.epoch:
            raise CheckpointError(f"{where}: sampler epoch {position.epoch} != timestamp epoch {timestamp.epoch}")
        self._restore_progress(payload, timestamp, latest)
        self.seam.start(raw, where, same_run=latest is not None)
        rng = payload.rng
        restore_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])
        return timestamp

    def _check_resumable(self, payload: Payload, where: str, same_run: bool) -> Any:
        """The same data (freshness, then order), signed taxonomy, surgery and policy; the sampler's position."""
        recorded, current = payload.data.get("manifest_version"), self.data.provenance.get("manifest_version")
        if same_run and recorded is not None and current is not None and current < recorded:
            raise CheckpointError(
                f"{where}: trained on release {recorded} of the dataset; {self.data.provenance['url']} "
                f"now holds release {current} (rolled back?)"
            )
        try:
            position = self.data.sampler.check_resumable(payload.sampler)
        except ValueError as error:
            hint = (
                "; to start from its weights only, with this run's own data, use --init-from its run (init.from_run)"
                if not same_run
                else ""
            )
            raise CheckpointError(f"{where}: {error}{hint}") from None
        # Keys never shape training (the order ignores them), but a run's evidence names one signed taxonomy
        # and policy: after a re-signing or a key rotation, continue from these weights as a new run.
        signed_then, signed_now = (
            payload.data.get("taxonomy_fingerprint"),
            self.data.provenance.get("taxonomy_fingerprint"),
        )
        if same_run and signed_then != signed_now:
            raise CheckpointError(
                f"{where}: trained under taxonomy {str(signed_then)[:12]}..., now {str(signed_now)[:12]}... (re-signed, or "
                f"keys rotated); a run's ledger names one signed taxonomy: continue in a new run directory with "
                f"--set checkpoint.load_path={where}"
            )
        if payload.surgery != applied_surgery(self.model):
            raise CheckpointError(
                f"{where}: written for a model with surgery {payload.surgery}, "
                f"this one has {applied_surgery(self.model)}; use the same algorithms"
            )
        if same_run and payload.policy_fingerprint != self.seam.policy_fingerprint:
            raise CheckpointError(f"{where}: trained under another routing policy (or none); use another --run-dir")
        return position

    def _load_training_state(self, payload: Payload, raw: dict[str, Any], where: str) -> None:
        """Weights, optimizer and loss scaler."""
        try:
            if self.placement.fsdp:  # every rank reads its own shards, resharded to this world size by DCP
                if not Path(where).is_dir():
                    raise CheckpointError(
                        f"{where}: a single-file checkpoint; a train.parallelism fsdp run loads "
                        "sharded (.dcp) checkpoints (train it with ddp, or start a new run)"
                    )
                sharded_checkpoint.load_into(Path(where), self.model, self.optimizer)
            else:
                self.model.load_state_dict(raw["model"])
                self.optimizer.load_state_dict(raw["optimizer"])
        except (RuntimeError, ValueError, KeyError) as error:
            reason = str(error).splitlines()[0]
            raise CheckpointError(f"{where}: does not fit this model/optimizer ({reason})") from None
        if self.scaler is not None and payload.scaler is not None:
            self.scaler.load_state_dict(payload.scaler)

    def _restore_progress(self, payload: Payload, timestamp: Timestamp, latest: Path | None) -> None:
        """Where the run was: time, evaluations, algorithms' and callbacks' state, what a summary reports."""
        self.state.timestamp = timestamp
        self.state.eval_metrics = dict(payload.eval_metrics)
        self.state.eval_by_class = dict(payload.eval_by_class)
        self._evaluated_at = payload.evaluated_at
        self._checkpointed_at = timestamp
        for algorithm in self.algorithms:
            algorithm.load_state_dict(payload.algorithms.get(algorithm.name, {}))
        for callback in self.engine.callbacks:
            saved = payload.callbacks.get(type(callback).__name__)
            if saved is not None:
                callback.load_state_dict(saved)
        if latest is not None:
            self._last_checkpoint = latest if self.dist.is_main else None
            self._last_loss = payload.train_loss
            self._earlier_seconds = payload.wall_seconds

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
        documents = {
            "taxonomy.yaml": self.recipe.data.taxonomy if self.data.taxonomy is not None else None,
            "policy.yaml": self.recipe.governance.policy,
        }
        for name, source in documents.items():
            for suffix in ("", ".sig") if source is not None else ():
                path = Path(f"{source}{suffix}")
                if path.is_file():
                    (self.run_dir / EVIDENCE).mkdir(exist_ok=True)
                    atomic_write_bytes(self.run_dir / EVIDENCE / f"{name}{suffix}", path.read_bytes())


def _dict_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        found: list[str] = []
        for key in keys:
            found += _dict_differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return found
    return [] if old == new else [prefix.rstrip(".")]
